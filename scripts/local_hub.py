"""Run a local Hugging Face Hub in the foreground, for demos and manual testing.

    python scripts/local_hub.py --root /tmp/hub --port 8765 --seed my-org/tiny=./tiny_model

then point the client at it with `HF_ENDPOINT=http://127.0.0.1:8765 HF_HUB_DISABLE_XET=1` (set before Python
imports huggingface_hub) or pass `endpoint=` explicitly. Repos persist under --root across restarts.
"""

import argparse
import sys
from pathlib import Path

# The server is test infrastructure and lives in tests/, outside the package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from hub_server import DEFAULT_USER, run_server  # noqa: E402


def parse_seed(value: str) -> tuple[str, str]:
    repo_id, sep, folder = value.partition("=")
    if not sep or repo_id.count("/") != 1 or not Path(folder).is_dir():
        raise argparse.ArgumentTypeError(f"expected NAMESPACE/NAME=EXISTING_FOLDER, got {value!r}")
    return repo_id, folder


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="folder holding the repos (created if missing)")
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: any free port)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--user", default=DEFAULT_USER, help="name returned by whoami")
    parser.add_argument("--seed", action="append", default=[], type=parse_seed, metavar="REPO_ID=FOLDER",
                        help="commit a local folder to a repo before serving (repeatable)")
    args = parser.parse_args(argv)
    run_server(args.root, port=args.port, seeds=args.seed, host=args.host, user=args.user)


if __name__ == "__main__":
    main()
