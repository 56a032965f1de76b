"""Benchmark: mlx-convert against mlx_lm.convert on the same synthetic checkpoint, side by side in one run.

    python scripts/bench_convert.py [--shape tinyllama|small] [--workdir /tmp/bench]

Builds a random bf16 Llama checkpoint of the given shape (TinyLlama-1.1B by default, 2.2 GB), then times each
command in a fresh process (page cache warm: the checkpoint is read once before timing) and reports wall time and
peak resident memory of the child. mlx-convert runs with --skip-validation so both do the same work.
"""

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {
    "tinyllama": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                      num_key_value_heads=4, vocab_size=32000),
    "small": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=4, vocab_size=32000),
}


def build_checkpoint(path: Path, shape: dict):
    """A llama checkpoint with random bf16 weights, written shard by shard (no transformers model in memory)."""
    import torch
    from safetensors.torch import save_file

    sys.path.insert(0, str(ROOT / "tests"))
    from checkpoints import save_tokenizer

    if (path / "config.json").exists():
        return
    path.mkdir(parents=True)
    h, i, v, n = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"], shape["num_hidden_layers"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    gen = torch.Generator().manual_seed(0)

    def rand(*dims):
        return (torch.randn(dims, generator=gen) * 0.02).to(torch.bfloat16)

    weight_map = {}
    save_file({"model.embed_tokens.weight": rand(v, h), "lm_head.weight": rand(v, h),
               "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)}, path / "model-00000.safetensors")
    weight_map.update(dict.fromkeys(["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"],
                                    "model-00000.safetensors"))
    for layer in range(n):
        p = f"model.layers.{layer}."
        tensors = {p + "self_attn.q_proj.weight": rand(h, h), p + "self_attn.k_proj.weight": rand(kv, h),
                   p + "self_attn.v_proj.weight": rand(kv, h), p + "self_attn.o_proj.weight": rand(h, h),
                   p + "mlp.gate_proj.weight": rand(i, h), p + "mlp.up_proj.weight": rand(i, h),
                   p + "mlp.down_proj.weight": rand(h, i), p + "input_layernorm.weight": torch.ones(h).bfloat16(),
                   p + "post_attention_layernorm.weight": torch.ones(h).bfloat16()}
        name = f"model-{layer + 1:05d}.safetensors"
        save_file(tensors, path / name)
        weight_map.update(dict.fromkeys(tensors, name))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "rms_norm_eps": 1e-5,
              "torch_dtype": "bfloat16", "rope_theta": 10000.0, "tie_word_embeddings": False, "max_position_embeddings": 2048, **shape}
    (path / "config.json").write_text(json.dumps(config, indent=2))
    save_tokenizer(path)


def depth_args(description: str):
    """--layers and --workdir, for the benchmarks that grow the TinyLlama shape in depth."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--layers", type=int, nargs="+", default=[11, 22])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/mlx-convert-bench"))
    return parser.parse_args()


def deep_checkpoints(args):
    """(layers, checkpoint folder) for each --layers depth of the TinyLlama shape, built once in --workdir."""
    for n in args.layers:
        src = args.workdir / f"src-tinyllama-{n}"
        build_checkpoint(src, {**SHAPES["tinyllama"], "num_hidden_layers": n})
        yield n, src


def measured(command: list, log=None) -> tuple:
    """(wall seconds, peak RSS in MB) of `command` in a fresh process; its stderr goes to the file `log` if given."""
    stderr = f"open({str(log)!r}, 'w')" if log else "subprocess.DEVNULL"
    wrapper = [sys.executable, "-c", "import resource, subprocess, sys, time; t = time.time(); "
               f"subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL, stderr={stderr}); "
               "print(time.time() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)", *command]
    out = subprocess.run(wrapper, check=True, capture_output=True, text=True).stdout.split()
    return float(out[0]), int(out[1]) / 1024


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tinyllama")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/mlx-convert-bench"))
    args = parser.parse_args()
    src = args.workdir / f"src-{args.shape}"
    build_checkpoint(src, SHAPES[args.shape])
    for f in src.glob("*.safetensors"):
        f.read_bytes()  # warm the page cache so both tools read from memory
    cases = {
        "float (bf16 copy)": ([], []),
        "4-bit": (["-q"], ["-q"]),
        "8-bit": (["-q", "--q-bits", "8"], ["-q", "--q-bits", "8"]),
    }
    rows = []
    for name, (ours_flags, theirs_flags) in cases.items():
        out_a, out_b = args.workdir / "out-mlx-convert", args.workdir / "out-mlx-lm"
        shutil.rmtree(out_a, ignore_errors=True)
        shutil.rmtree(out_b, ignore_errors=True)
        ours = measured(["mlx-convert", "--hf-path", str(src), "--mlx-path", str(out_a), "--skip-validation",
                         *ours_flags])
        theirs = measured([sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(src), "--mlx-path",
                           str(out_b), *theirs_flags])
        rows.append((name, ours, theirs))
    print(f"\nshape {args.shape}; wall seconds and peak RSS (MB) per command\n")
    print("| case | mlx-convert s | mlx_lm.convert s | speed-up | mlx-convert MB | mlx_lm MB | memory ratio |")
    print("|---|---|---|---|---|---|---|")
    for name, (ts, tm), (os_, om) in rows:
        print(f"| {name} | {ts:.1f} | {os_:.1f} | {os_ / ts:.2f}x | {tm:,.0f} | {om:,.0f} | {tm / om:.2f} |")


if __name__ == "__main__":
    main()
