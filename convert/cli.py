"""The `mlx-convert` command: parses flags into a ConvertPlan and calls the same `run` as the Python API."""

import errno
import os
import re
import signal
import sys
import textwrap
import traceback
from pathlib import Path

import click

from .errors import ConvertError
from .plan import DTYPES, FP_MODES, GB, Q_METHODS, RECIPES, ConvertPlan, variant_plans


class ByteSize(click.ParamType):
    """A size such as 5GB, 500MB, 200KB or a plain number of bytes."""

    name = "size"
    UNITS = {"KB": 1 << 10, "MB": 1 << 20, "GB": GB, "B": 1}

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B)?\s*", str(value), re.IGNORECASE)
        size = int(float(match[1]) * self.UNITS[(match[2] or "B").upper()]) if match else 0
        if size <= 0:
            self.fail(f"{value!r} is not a size such as 5GB, 500MB or 200KB", param, ctx)
        return size


class ConvertCommand(click.Command):
    """Our errors are for the user: `Error: <one line>` and exit code 1, never a traceback (under `main` and under
    click's test runner alike)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except ConvertError as e:
            raise click.ClickException(str(e)) from None


@click.command(cls=ConvertCommand, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--hf-path", required=True, help="Source: a Hub repo id (org/Model) or a local checkpoint folder.")
@click.option("--revision", help="Branch, tag or commit of the Hub repo (default: main).")
@click.option("--mlx-path", type=click.Path(), help="Output folder (default: ./<Model>-mlx, or with the variant: "
              "<Model>-mlx-4bit, -mlx-mxfp4, -mlx-mixed_4_6, -mlx-bf16). A non-empty folder is refused unless "
              "--overwrite.")
@click.option("-q", "--quantize", is_flag=True, help="Quantize the weights (default 4-bit affine, group size 64).")
@click.option("--q-bits", type=int, help="Bits per weight for affine quantization: 2, 3, 4, 5, 6 or 8 (default 4).")
@click.option("--q-group-size", type=int, help="Weights sharing one scale: 32, 64 or 128 (default 64).")
@click.option("--q-mode", type=click.Choice(["affine", *FP_MODES]), default="affine", show_default=True,
              help="affine (scale + bias per group), or a block floating-point format, which fixes bits and group "
                   "size: mxfp4 (4 bits, 32), nvfp4 (4, 16), mxfp8 (8, 32). Implies --quantize.")
@click.option("--quant-recipe", "--quant-predicate", "quant_recipe", type=click.Choice(sorted(RECIPES)),
              help="Mixed precision: mixed_A_B gives B bits to embeddings, the output head and the value/down "
                   "projections of sensitive layers, A bits to the rest (implies --quantize).")
@click.option("--q-method", type=click.Choice(Q_METHODS), help="How affine codes, scales and biases are chosen; "
              "every method writes the same MLX format that any MLX reader loads. rtn: round to nearest from each "
              "group's min and max (mx.quantize, mlx_lm.convert). search: per group, the clipping range that "
              "minimises the error weighted by calibration activations. gptq: error-feedback rounding with Hessians "
              "of calibration activations, layer by layer (SmolLM2-135M at 3-4 bits: KL to the float model 27-31% "
              "of rtn's, search 36-42%; calibration takes about 55 s for SmolLM2-135M and 6-9 min for a 1.1B model on "
              "2 CPU cores, where rtn takes seconds); mixture-of-experts layers are calibrated per expert on the "
              "tokens routed to each. Default: gptq below 8 bits; rtn at 8 bits, for block formats "
              "and sources without a tokenizer.")
@click.option("--calibration-file", type=click.Path(exists=True, dir_okay=False), help="Text that calibrates "
              "--q-method gptq/search (default: a built-in mix of prose, code and chat in 8 languages). Plain "
              "text; lines '<<<document>>>' separate documents. The card names the file.")
@click.option("--target-bpw", type=float, help="Mixed precision within this many bits per weight (e.g. 4.5): "
              "each layer's width (2-8 bits, group size --q-group-size) chosen by its measured sensitivity on the "
              "calibration text, the widths that remove the most estimated loss per added bit first; a tied "
              "embedding counts as the output layer. Implies --quantize; the card and log state the allocation "
              "and the bits per weight achieved.")
@click.option("--dtype", type=click.Choice(DTYPES), help="Float dtype of unquantized weights (default: the "
              "checkpoint's `torch_dtype`/`dtype`).")
@click.option("-d", "--dequantize", is_flag=True, help="Turn an MLX-quantized model back into floats.")
@click.option("--variants", help="Several outputs from one read of the source, e.g. bf16,8,6,4 (float dtypes bf16/"
              "fp16/fp32, bit widths, mixed_A_B recipes, mxfp4/nvfp4/mxfp8), each written and validated; the gate's "
              "source-only parts run once. Folders: <--mlx-path>-<variant> (default ./<Model>-mlx-4bit, -mlx-bf16, "
              "...). Repos: <--upload-repo>-<variant>, or --upload-repo with {variant} replaced (me/Model-{variant}"
              "-mlx). Published only when every variant passes. Replaces -q, --q-bits, --q-mode, --quant-recipe.")
@click.option("--upload-repo", help="Publish the validated output to this Hub repo (me/Model-4bit).")
@click.option("--private", is_flag=True, help="Create the uploaded repo as private.")
@click.option("--dry-run", is_flag=True, help="Convert and validate, then show what would be published.")
@click.option("--skip-validation", is_flag=True, help="Do not compare with the transformers model (written "
              "into the model card).")
@click.option("--max-shard-size", type=ByteSize(), default="5GB", show_default=True, help="Largest output "
              "safetensors file (e.g. 2GB, 500MB); shards are streamed tensor by tensor, so peak memory does "
              "not grow with it.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty --mlx-path folder.")
@click.option("--validate-only", is_flag=True, help="Convert nothing: validate the existing --mlx-path folder "
              "against --hf-path and write its validation.json (exit code 1 if it fails); with --upload-repo, "
              "then publish it (retries a failed upload without converting again).")
def cli(**flags):
    """Convert a Hugging Face checkpoint to MLX, validate it against transformers, and optionally publish it.

    \b
    Examples:
      mlx-convert --hf-path org/Model -q
      mlx-convert --hf-path ./my-checkpoint --quant-recipe mixed_4_6 --mlx-path out
      mlx-convert --hf-path org/Model -q --upload-repo me/Model-4bit
      mlx-convert --hf-path org/Model --variants bf16,8,4 --upload-repo me/Model

    Add --verbose to any command to see the full traceback behind an error.

    Environment: HF_TOKEN (or `hf auth login`), HF_HOME, HF_ENDPOINT, HF_HUB_OFFLINE work as in huggingface_hub.
    MLX_CONVERT_BLAS=none keeps MLX's bundled CPU BLAS (Linux; default: OpenBLAS, much faster for the gate).

    Repos that ship their own modeling code (auto_map) convert with the native implementation when their
    model_type is one of those below; the repo's code is neither downloaded nor run.
    """
    from tqdm import tqdm

    from .api import publish_existing, run, run_variants, validate_existing

    progress = lambda it, **kw: tqdm(it, **kw)  # noqa: E731
    variants = flags.pop("variants")
    if variants:
        if flags["validate_only"]:
            raise click.UsageError("--validate-only checks one folder: drop --variants")
        flags.pop("validate_only")
        for result in run_variants(variant_plans(flags, variants), progress=progress, log=_stderr):
            click.echo(summary(result))
        return

    if flags.pop("validate_only"):
        if not flags["mlx_path"]:
            raise click.UsageError("--validate-only needs --mlx-path, the folder to check")
        plan = ConvertPlan(**flags)
        if plan.upload_repo:
            published = publish_existing(plan, progress=progress, log=_stderr)
        else:
            report = validate_existing(plan, progress=progress, log=_stderr)
            if not report.passed:
                raise ConvertError(f"validation failed: {'; '.join(report.failures)}")
        click.echo(f"Validation of {plan.mlx_path}: passed")
        if plan.upload_repo:
            click.echo(("Would publish to " if published.dry_run else "Published to ") + published.url)
        return
    plan = ConvertPlan(**flags)
    result = run(plan, progress=progress, log=_stderr)
    click.echo(summary(result))


def _stderr(message: str):
    click.echo(message, err=True)


def summary(result) -> str:
    size = result.size_bytes / (1 << 20)
    lines = [f"Saved {result.path} ({size:,.1f} MiB, {result.bits_per_weight:.2f} bits per weight, "
             f"{result.parameters / 1e6:,.1f}M parameters) in {result.seconds:.1f} s"]
    if result.validation is not None:
        lines.append("Validation: " + ("passed" if result.validation.passed else "FAILED"))
    if result.published is not None:
        verb = "Would publish to" if result.published.dry_run else "Published to"
        lines.append(f"{verb} {result.published.url}")
    return "\n".join(lines)


def _supported_types_help() -> str:
    import mlx_arch
    from mlx_arch.core.containers import CONTAINERS

    # indented like the docstring, which click dedents as a whole
    fill = lambda names: textwrap.fill(", ".join(names), 76, initial_indent="      ",  # noqa: E731
                                       subsequent_indent="      ")
    containers = sorted(f"{t} ({c.text_type})" for t, c in CONTAINERS.items())
    return (f"\n    \b\n    Supported model types:\n{fill(mlx_arch.supported_model_types())}\n"
            f"\n    \b\n    Multimodal containers (their text model is converted):\n{fill(containers)}\n")


cli.help = (cli.help or "") + _supported_types_help()


ISSUES_URL = "https://github.com/mlx-convert/mlx-convert/issues"


def _terminate(signum, frame):
    # SIGTERM takes the same way out as Ctrl-C: staging and scratch folders are removed on the way.
    raise KeyboardInterrupt


def main(argv=None):
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "--verbose" in argv
    if verbose:
        argv.remove("--verbose")
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        cli.main(args=argv, standalone_mode=False)
    except (click.exceptions.Abort, KeyboardInterrupt):
        click.echo("Interrupted: no partial output was left behind.", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except ConvertError as e:
        click.echo(f"Error: {e}", err=True)
        sys.exit(1)
    except OSError as e:  # disk full, no permission, ...: the staging and scratch folders are already gone
        _traceback(verbose)
        click.echo(f"Error: {os_error_message(e)}", err=True)
        sys.exit(1)
    except Exception as e:  # a fault in our own code: say so, briefly, and where to report it
        _traceback(verbose)
        click.echo(f"Error: {internal_error_message(e)}", err=True)
        sys.exit(2)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _traceback(verbose: bool):
    if verbose:
        traceback.print_exc()


def internal_error_message(e: Exception) -> str:
    frame = traceback.extract_tb(e.__traceback__)[-1] if e.__traceback__ else None
    where = f" at {Path(frame.filename).name}:{frame.lineno}" if frame else ""
    text = (str(e).splitlines() or [""])[0][:200]
    return (f"internal error in mlx-convert ({type(e).__name__}{': ' + text if text else ''}{where}); this is a "
            f"bug, not your input: please report it at {ISSUES_URL} with the output of the same command run with "
            "--verbose. Nothing was left in the output folder.")


def os_error_message(e: OSError) -> str:
    where = f" ({e.filename})" if e.filename else ""
    hint = {errno.ENOSPC: "free some space or choose another --mlx-path (a conversion needs room for its output, "
                          "and for a copy of .bin sources)",
            errno.EACCES: "choose an --mlx-path you can write to"}.get(e.errno, "nothing was written")
    return f"{e.strerror or e}{where}: {hint}"


if __name__ == "__main__":
    main()
