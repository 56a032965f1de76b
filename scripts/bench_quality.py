"""Benchmark: quantization quality per method, side by side with `mlx_lm.convert -q` (round to nearest), in one run.

    python scripts/bench_quality.py [--source /tmp/smollm2] [--bits 4 3] [--group-size 64]
                                    [--methods rtn search gptq] [--workdir /tmp/mlx-convert-quality]

On SmolLM2-135M-Instruct (rebuilt by scripts/make_smollm2.py when --source is not given), each variant is converted
in a fresh process (wall time and peak RSS of the child; mlx-convert with --skip-validation, so both tools do the
same work), then evaluated against the float model on the whole built-in held-out text (convert/data/heldout.txt,
which never calibrates): KL(float || quantized) per position, top-1 agreement, perplexity ratio, all in float32
activations (FACTS: the CPU's bf16 quantized matmul adds its own error). Prints a Markdown table.
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


def source_folder(path) -> Path:
    if path is not None:
        return Path(path)
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


def convert_commands(src: Path, out: Path, bits: int, group: int, method: str) -> list:
    if method == "mlx_lm.convert":
        return [sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(src), "--mlx-path", str(out), "-q",
                "--q-bits", str(bits), "--q-group-size", str(group)]
    return [sys.executable, "-c", "import sys; from convert.cli import main; main(sys.argv[1:])", "--hf-path",
            str(src), "--mlx-path", str(out), "-q", "--q-bits", str(bits), "--q-group-size", str(group),
            "--q-method", method, "--skip-validation"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, help="a float checkpoint folder (default: SmolLM2-135M, built)")
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--methods", nargs="+", default=["rtn", "search", "gptq"])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/mlx-convert-quality"))
    parser.add_argument("--tokens", type=int, help="held-out tokens (default: the whole text)")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from convert import heldout

    src = source_folder(args.source)
    tokenizer = AutoTokenizer.from_pretrained(str(src))
    vocab = json.loads((src / "config.json").read_text())["vocab_size"]
    batches = heldout.passes(heldout.rows(tokenizer, vocab, max_tokens=args.tokens), vocab)
    tokens = sum(int(mask.sum()) for _, mask in batches)
    print(f"held-out text: {tokens} tokens in {len(batches)} batches; float reference...", flush=True)
    args.workdir.mkdir(parents=True, exist_ok=True)
    reference = []
    for i, (ids, mask) in enumerate(batches):  # kept on disk: the float logits of the whole text are gigabytes
        np.save(args.workdir / f"reference-{i}.npy", heldout.reference_logits(src, ids, mask))
        reference.append(np.load(args.workdir / f"reference-{i}.npy", mmap_mode="r"))
    parameters = parameter_count(src)
    rows = []
    for bits in args.bits:
        baseline = None
        for method in ["mlx_lm.convert", *args.methods]:
            out = args.workdir / f"{bits}bit-{method}"
            shutil.rmtree(out, ignore_errors=True)
            seconds, peak = measured(convert_commands(src, out, bits, args.group_size, method),
                                     log=args.workdir / f"{bits}bit-{method}.log")
            metrics = heldout.summarize([heldout.token_stats(heldout.mlx_logits(out, ids), ref, ids, mask)
                                         for (ids, mask), ref in zip(batches, reference)])
            baseline = baseline or metrics["kl_mean"]
            rows.append((bits, method, bits_per_weight(out, parameters), metrics, metrics["kl_mean"] / baseline,
                         seconds, peak))
            print(f"{bits}-bit {method}: KL {metrics['kl_mean']:.4f}, {seconds:.0f} s", flush=True)
    print(f"\n{src.name}, group size {args.group_size}, {tokens} held-out tokens (convert/data/heldout.txt); "
          "KL(float || quantized) per position, float32 activations; time and peak RSS of the conversion process\n")
    print("| bits | method | bits/weight | KL mean | KL / mlx_lm's | top-1 | perplexity ratio | time s | peak MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for bits, method, bpw, m, ratio, seconds, peak in rows:
        print(f"| {bits} | {method} | {bpw:.3f} | {m['kl_mean']:.4f} | {ratio:.0%} | {m['top1']:.1%} | "
              f"{m['perplexity_ratio']:.3f} | {seconds:.1f} | {peak:,.0f} |")


if __name__ == "__main__":
    main()
