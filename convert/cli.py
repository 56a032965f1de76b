"""The `mlx-convert` command: parses flags into a ConvertPlan and calls the same `run` as the Python API."""

import os
import sys

import click

from .errors import ConvertError
from .plan import DTYPES, FP_MODES, GB, RECIPES, ConvertPlan


def _size(value: str) -> int:
    units = {"KB": 1 << 10, "MB": 1 << 20, "GB": GB}
    value = value.strip().upper()
    for unit, factor in units.items():
        if value.endswith(unit):
            return int(float(value[: -len(unit)]) * factor)
    return int(value)


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--hf-path", required=True, help="Source: a Hub repo id (org/Model) or a local checkpoint folder.")
@click.option("--revision", help="Branch, tag or commit of the Hub repo (default: main).")
@click.option("--mlx-path", type=click.Path(), help="Output folder (default: ./<Model>-<variant>, e.g. Model-4bit).")
@click.option("-q", "--quantize", is_flag=True, help="Quantize the weights (default 4-bit affine, group size 64).")
@click.option("--q-bits", type=int, help="Bits per weight for affine quantization: 2, 3, 4, 5, 6 or 8 (default 4).")
@click.option("--q-group-size", type=int, help="Weights sharing one scale: 32, 64 or 128 (default 64).")
@click.option("--q-mode", type=click.Choice(["affine", *FP_MODES]), default="affine", show_default=True,
              help="affine (scale + bias per group), or the block floating-point formats mxfp4, nvfp4, mxfp8.")
@click.option("--quant-recipe", "--quant-predicate", "quant_recipe", type=click.Choice(sorted(RECIPES)),
              help="Mixed precision: mixed_A_B gives B bits to embeddings, the output head and the value/down "
                   "projections of sensitive layers, A bits to the rest (implies --quantize).")
@click.option("--dtype", type=click.Choice(DTYPES), help="Float dtype of unquantized weights (default: the "
              "checkpoint's `torch_dtype`/`dtype`).")
@click.option("-d", "--dequantize", is_flag=True, help="Turn an MLX-quantized model back into floats.")
@click.option("--upload-repo", help="Publish the validated output to this Hub repo (me/Model-4bit).")
@click.option("--private", is_flag=True, help="Create the uploaded repo as private.")
@click.option("--dry-run", is_flag=True, help="Convert and validate, then show what would be published.")
@click.option("--skip-validation", is_flag=True, help="Do not compare with the transformers model (written "
              "into the model card).")
@click.option("--max-shard-size", default="5GB", show_default=True, help="Largest output shard; peak memory is "
              "bounded by it.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty --mlx-path folder.")
def cli(**flags):
    """Convert a Hugging Face checkpoint to MLX, validate it against transformers, and optionally publish it.

    \b
    Examples:
      mlx-convert --hf-path Qwen/Qwen3-0.6B -q
      mlx-convert --hf-path ./my-checkpoint --quant-recipe mixed_4_6 --mlx-path out
      mlx-convert --hf-path org/Model -q --upload-repo me/Model-4bit

    Environment: HF_TOKEN (or `hf auth login`), HF_HOME, HF_ENDPOINT, HF_HUB_OFFLINE work as in huggingface_hub.
    """
    from tqdm import tqdm

    from .api import default_mlx_path, run

    flags["max_shard_size"] = _size(flags["max_shard_size"])
    flags["mlx_path"] = flags["mlx_path"] or default_mlx_path(flags)
    plan = ConvertPlan(**flags)
    result = run(plan, progress=lambda it, **kw: tqdm(it, **kw), log=lambda m: click.echo(m, err=True))
    click.echo(summary(result))


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


def main(argv=None):
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        cli.main(args=argv, standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except ConvertError as e:
        click.echo(f"Error: {e}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
