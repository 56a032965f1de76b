"""Benchmark on a Linux machine with an NVIDIA GPU (MLX's CUDA backend): bare convert and convert + gate, in one
process, twice each, so that MLX's first-use kernel compilation shows as the difference between the first and the
second run; prints a table with wall times, the gate's parts, and peak host and GPU memory.

    python scripts/bench_gpu.py [--shape tinyllama|7b] [--layers N] [--workdir /tmp/bench-gpu]
"""

import argparse
import resource
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import convert  # noqa: E402  (loads the CPU BLAS before mlx.core)
from bench_convert import SHAPES, build_checkpoint  # noqa: E402

SHAPES = {**SHAPES, "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                               num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)}


def timed(**kwargs):
    out = kwargs.pop("out")
    shutil.rmtree(out, ignore_errors=True)
    start = time.time()
    result = convert.convert(kwargs.pop("src"), out, quantize=True, log=lambda m: None, **kwargs)
    return time.time() - start, result


def main():
    import mlx.core as mx
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tinyllama")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench-gpu"))
    parser.add_argument("--layers", type=int, help="decoder layers (default: the shape's); first-use compilation "
                        "depends on the shapes of the products, not on depth, so a few layers measure it")
    parser.add_argument("--runs", type=int, default=2, help="runs of each command (2 shows compilation apart)")
    parser.add_argument("--q-method", default="rtn", help="rtn (default: mlx-lm's rounding, so the gate's cost "
                        "shows alone), search or gptq (calibration runs on the CPU in numpy)")
    args = parser.parse_args()
    shape = {**SHAPES[args.shape], **({"num_hidden_layers": args.layers} if args.layers else {})}
    src = args.workdir / f"src-{args.shape}-{shape['num_hidden_layers']}"
    start = time.time()
    build_checkpoint(src, shape)
    print(f"device {mx.default_device()}, checkpoint built in {time.time() - start:.0f} s", flush=True)
    rows = []
    plan = [(f"bare convert (run {i + 1})", dict(skip_validation=True)) for i in range(args.runs)]
    plan += [(f"convert + gate (run {i + 1})", {}) for i in range(args.runs)]
    for label, kwargs in plan:
        seconds, result = timed(src=str(src), out=args.workdir / "out", q_method=args.q_method, **kwargs)
        gate = result.validation
        rows.append((label, seconds, gate))
        print(label, f"{seconds:.1f} s", gate.passed if gate else "", gate.failures if gate else "", flush=True)
    host = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    gpu_mlx = mx.get_peak_memory() / 2**20
    gpu_torch = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0
    print(f"\n{args.shape}, 4-bit; peak host RSS {host:,.0f} MB, peak GPU memory MLX {gpu_mlx:,.0f} MB, "
          f"torch {gpu_torch:,.0f} MB\n")
    print("| run | seconds | gate passed | gate parts (s) |")
    print("|---|---|---|---|")
    for label, seconds, gate in rows:
        parts = ", ".join(f"{k} {v:.1f}" for k, v in gate.seconds.items()) if gate else ""
        print(f"| {label} | {seconds:.1f} | {gate.passed if gate else '-'} | {parts} |")
    print(f"\nbackend: {rows[-1][2].backend}")
    if args.runs > 1:
        n = args.runs
        print(f"first-use compilation, approx: bare {rows[0][1] - rows[1][1]:.1f} s, with gate "
              f"{rows[n][1] - rows[n + 1][1]:.1f} s")


if __name__ == "__main__":
    main()
