"""Benchmark: peak memory of the validation gate against model depth (it should not grow with the model).

    python scripts/bench_validate.py [--layers 11 22] [--workdir /tmp/mlx-convert-bench]

For each depth, builds a random bf16 Llama checkpoint of TinyLlama-1.1B's layer shape, converts it to 4-bit
without validation, then times `mlx-convert --validate-only` in a fresh process and reports its wall time and peak
resident memory next to the size of the float32 model that an unstreamed gate would hold (twice: reference and
ours), then where the gate's time went (the log's "gate time by part" line).
"""

import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_convert import deep_checkpoints, depth_args, measured  # noqa: E402


def gate_times(log: Path) -> dict:
    """{part: seconds} from the log line "gate time by part: tokenizer 1.8 s, mlx 13.2 s, ..."."""
    line = next(x for x in log.read_text().splitlines() if x.startswith("gate time by part: "))
    return {name: float(value) for name, value, _ in (p.rsplit(" ", 2) for p in line.split(": ", 1)[1].split(", "))}


def main():
    args = depth_args(__doc__.splitlines()[0])
    rows, parts = [], []
    for n, src in deep_checkpoints(args):
        out, log = args.workdir / f"out-validate-{n}", args.workdir / f"validate-{n}.log"
        shutil.rmtree(out, ignore_errors=True)
        measured(["mlx-convert", "--hf-path", str(src), "--mlx-path", str(out), "-q", "--skip-validation"])
        seconds, peak = measured(["mlx-convert", "--hf-path", str(src), "--mlx-path", str(out), "--validate-only"],
                                 log=log)
        bf16 = sum(f.stat().st_size for f in src.glob("*.safetensors")) / 2**20
        rows.append((n, bf16, 2 * bf16, seconds, peak))
        parts.append((n, gate_times(log)))
    print("\nvalidate-only on a 4-bit conversion; sizes and peak RSS in MB\n")
    print("| layers | source bf16 | model in float32 | validate s | peak RSS | peak / float32 model |")
    print("|---|---|---|---|---|---|")
    for n, bf16, fp32, seconds, peak in rows:
        print(f"| {n} | {bf16:,.0f} | {fp32:,.0f} | {seconds:.1f} | {peak:,.0f} | {peak / fp32:.2f} |")
    names = list(parts[0][1])
    print("\nwhere the gate's time goes, seconds\n")
    print("| layers | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for n, seconds in parts:
        print(f"| {n} | " + " | ".join(f"{seconds[k]:.1f}" for k in names) + " |")


if __name__ == "__main__":
    main()
