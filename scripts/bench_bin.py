"""Benchmark: peak memory of converting a `.bin` (PyTorch pickle) checkpoint against model depth.

    python scripts/bench_bin.py [--layers 11 22] [--workdir /tmp/mlx-convert-bench]

For each depth, builds the random bf16 Llama checkpoint of TinyLlama-1.1B's layer shape that bench_convert.py uses,
rewrites its shards as `pytorch_model-*.bin` files with an index, then converts both formats to 4-bit (without
validation) in fresh processes and reports wall time and peak resident memory. `.bin` tensors are streamed into a
scratch safetensors file and read lazily, so the peak should follow the largest source file, not the model.
mlx_lm.convert has no `.bin` reader, so there is no side-by-side column here.
"""

import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_convert import deep_checkpoints, depth_args, measured  # noqa: E402


def as_bin(src: Path, dst: Path):
    """The same checkpoint with every safetensors shard rewritten as a `.bin` file."""
    import torch
    from safetensors.torch import load_file

    if (dst / "config.json").exists():
        return
    dst.mkdir(parents=True)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    renamed = {f: f.replace("model-", "pytorch_model-").replace(".safetensors", ".bin")
               for f in set(index["weight_map"].values())}
    for old, new in renamed.items():
        torch.save(load_file(src / old), dst / new)
    weight_map = {k: renamed[f] for k, f in index["weight_map"].items()}
    (dst / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for f in src.iterdir():
        if f.suffix != ".safetensors" and f.name != "model.safetensors.index.json":
            shutil.copy(f, dst / f.name)


def main():
    args = depth_args(__doc__.splitlines()[0])
    rows = []
    for n, safe in deep_checkpoints(args):
        binary = args.workdir / f"bin-tinyllama-{n}"
        as_bin(safe, binary)
        size = sum(f.stat().st_size for f in binary.glob("*.bin")) / 2**20
        largest = max(f.stat().st_size for f in binary.glob("*.bin")) / 2**20
        for fmt, src in (("safetensors", safe), (".bin", binary)):
            out = args.workdir / f"out-bin-bench-{n}"
            shutil.rmtree(out, ignore_errors=True)
            seconds, peak = measured(["mlx-convert", "--hf-path", str(src), "--mlx-path", str(out), "-q",
                                      "--skip-validation"])
            rows.append((n, fmt, size, largest, seconds, peak))
            shutil.rmtree(out, ignore_errors=True)
    print("\nmlx-convert -q from each source format; sizes and peak RSS in MB\n")
    print("| layers | source | model size | largest file | seconds | peak RSS |")
    print("|---|---|---|---|---|---|")
    for n, fmt, size, largest, seconds, peak in rows:
        print(f"| {n} | {fmt} | {size:,.0f} | {largest:,.0f} | {seconds:.1f} | {peak:,.0f} |")


if __name__ == "__main__":
    main()
