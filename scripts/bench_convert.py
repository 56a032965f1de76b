"""Benchmark: mlx-convert against mlx_lm.convert on the same synthetic checkpoint, side by side in one run.

    python scripts/bench_convert.py [--shape tinyllama|small] [--workdir /tmp/bench] [--cases 0 1 ...]

Builds a random bf16 Llama checkpoint of the given shape (TinyLlama-1.1B by default, 2.2 GB), then times each
command in a fresh process (page cache warm: the checkpoint is read once before timing) and reports wall time and
peak resident memory of the child: convert only (--skip-validation, round to nearest: the same work as mlx-lm),
convert + gate (rtn, and the default gptq), and four variants with their gates from one run.
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
    # 14.5B parameters, 29 GB in bf16: more than this machine's memory (24 GiB); run with --cases 3 --ours-only
    "30gb": dict(hidden_size=6144, intermediate_size=16384, num_hidden_layers=36, num_attention_heads=48,
                 num_key_value_heads=8, vocab_size=32000),
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
    # 0.02 at TinyLlama's width; wider models get smaller weights, so that each layer keeps the activations' scale
    # (with 0.02 at width 6144 they grow ~1.6x per product and the random model is hypersensitive to any rounding)
    std = 0.02 * min(1.0, (2048 / h) ** 0.5)

    def rand(*dims):
        return (torch.randn(dims, generator=gen) * std).to(torch.bfloat16)

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


CASES = {  # name: (mlx-convert flags, mlx_lm.convert flags or None)
    "float (bf16 copy), convert only": (["--skip-validation"], []),
    "4-bit rtn, convert only": (["-q", "--q-method", "rtn", "--skip-validation"], ["-q"]),
    "8-bit, convert only": (["-q", "--q-bits", "8", "--skip-validation"], ["-q", "--q-bits", "8"]),
    "4-bit rtn + gate": (["-q", "--q-method", "rtn"], ["-q"]),
    "4-bit default (gptq) + gate": (["-q"], ["-q"]),
    "variants bf16,8,6,4 (rtn) + gates": (["--variants", "bf16,8,6,4", "--q-method", "rtn"], None),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tinyllama")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/mlx-convert-bench"))
    parser.add_argument("--cases", nargs="+", choices=range(len(CASES)), type=int, default=list(range(len(CASES))),
                        help=" ".join(f"{i}: {name};" for i, name in enumerate(CASES)))
    parser.add_argument("--ours-only", action="store_true", help="skip mlx_lm.convert (which holds the whole model "
                        "in memory: for checkpoints larger than memory)")
    args = parser.parse_args()
    src = args.workdir / f"src-{args.shape}"
    build_checkpoint(src, SHAPES[args.shape])
    for f in src.glob("*.safetensors"):
        with open(f, "rb") as handle:  # warm the page cache so both tools read from memory (as far as it holds)
            while handle.read(1 << 26):
                pass
    rows = []
    for name in [list(CASES)[i] for i in args.cases]:
        ours_flags, theirs_flags = CASES[name]
        for old in args.workdir.glob("out-*"):
            shutil.rmtree(old, ignore_errors=True)
        out_a, out_b = args.workdir / "out-mlx-convert", args.workdir / "out-mlx-lm"
        ours = measured(["mlx-convert", "--hf-path", str(src), "--mlx-path", str(out_a), *ours_flags],
                        log=args.workdir / f"log-{len(rows)}.txt")
        theirs = None
        if theirs_flags is not None and not args.ours_only:
            theirs = measured([sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(src), "--mlx-path",
                               str(out_b), *theirs_flags])
        rows.append((name, ours, theirs))
        print(name, ours, theirs, flush=True)
    print(f"\nshape {args.shape}; wall seconds and peak RSS (MB) per command (mlx_lm.convert: same bits, "
          "round to nearest, no gate)\n")
    print("| case | mlx-convert s | mlx_lm.convert s | time ratio (ours / mlx-lm) | mlx-convert MB | mlx_lm MB | "
          "memory ratio |")
    print("|---|---|---|---|---|---|---|")
    for name, (ts, tm), theirs in rows:
        if theirs is None:
            print(f"| {name} | {ts:.1f} | - | - | {tm:,.0f} | - | - |")
            continue
        os_, om = theirs
        print(f"| {name} | {ts:.1f} | {os_:.1f} | {ts / os_:.2f}x | {tm:,.0f} | {om:,.0f} | {tm / om:.2f} |")
    by_name = {name: ours for name, ours, _ in rows}
    one, four = by_name.get("4-bit rtn + gate"), by_name.get("variants bf16,8,6,4 (rtn) + gates")
    if one and four:
        print(f"\nfour variants with their gates / one 4-bit variant with its gate: {four[0] / one[0]:.2f}x")


if __name__ == "__main__":
    main()
