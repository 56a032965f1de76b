"""Pre-flight checks that need only the config, the file list and the plan: everything that can fail a run is
found before any weight is downloaded or converted (a failure after an hour of conversion is the worst kind).

- the config describes a model of sane size (positive, plausible dimensions; our model can be built from it);
- the gate will have a tokenizer to probe with;
- the output folder is writable and its disk has room for the result (estimated from the plan);
- for a run that publishes: the repo id is valid, a token is present and may write to that namespace, and the
  remote repo, if it exists, holds a conversion of the same source (another model is not overwritten unless
  --overwrite is given).
"""

import os
import shutil
from pathlib import Path
from typing import Optional

import mlx_arch
from mlx_arch.core import fp8
from mlx_arch.core.base import source_dtype, text_config

from .errors import ConvertError
from .plan import ConvertPlan

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model", "tekken.json")
# Dimensions a config may state, and the largest value we believe (DeepSeek-V3's vocabulary is 129k, hidden 7168).
SIZES = {"hidden_size": 1 << 16, "num_hidden_layers": 1024, "num_attention_heads": 1024, "vocab_size": 1 << 22,
         "intermediate_size": 1 << 20, "num_key_value_heads": 1024, "head_dim": 4096}
BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def check_config(config: dict):
    """Refuse a config whose sizes are missing, not positive integers or implausible, or from which our model of
    its model_type cannot be built; one line that names the key."""
    text = text_config(config)
    for key, largest in SIZES.items():
        value = text.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= largest:
            raise ConvertError(f"config.json: {key} = {value!r} is not a plausible size (a positive integer up to "
                               f"{largest:,}); fix the config")
    stored = source_dtype(config)
    if stored is not None and stored not in BYTES:
        raise ConvertError(f"config.json: dtype {stored!r} is not a float dtype (float32, float16, bfloat16); fix the "
                           "config or pass --dtype")
    try:
        mlx_arch.build_model(config)  # lazy: nothing is allocated
    except (TypeError, ValueError, KeyError, AttributeError, ZeroDivisionError, IndexError) as e:
        detail = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise ConvertError(f"config.json does not describe a valid {config.get('model_type')} model: "
                           f"{type(e).__name__}: {detail}") from None


def check_tokenizer_files(files: list, plan: ConvertPlan):
    if plan.skip_validation:
        return
    names = {Path(f).name for f in files}
    if not names & set(TOKENIZER_FILES):
        raise ConvertError(f"the source has no tokenizer ({', '.join(TOKENIZER_FILES[:3])}, ...), which the "
                           "validation gate needs to build its probes: add the tokenizer files or pass "
                           "--skip-validation")


def estimated_output_bytes(config: dict, weight_bytes: int, plan: ConvertPlan, dtype: str) -> int:
    """The output's size from the source's: parameters (source bytes / bytes per source parameter, one for FP8
    sources) times the bytes per output parameter (packed bits plus a float16 scale and bias per group when
    quantized)."""
    params = weight_bytes / (1 if fp8.is_source(config) else BYTES.get(source_dtype(config) or "float16", 2))
    if plan.quantize:
        per_param = plan.q_bits / 8 + 4 / plan.q_group_size
    else:
        per_param = BYTES.get(dtype, 2)
    return int(params * per_param)


def existing_ancestor(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return path


def check_room(target: Path, needed: int, what: str):
    """The disk that will hold `target` is writable and has room for `needed` bytes (and a 5% margin)."""
    where = existing_ancestor(target)
    if not os.access(where, os.W_OK):
        raise ConvertError(f"cannot write to {where}: choose an --mlx-path you can write to")
    free = shutil.disk_usage(where).free
    if free < needed * 1.05:
        raise ConvertError(f"not enough disk space for {what}: about {needed / 2**30:.1f} GiB needed beside "
                           f"{target}, {free / 2**30:.1f} GiB free; free some space or choose another --mlx-path")


def check_publish_target(plan: ConvertPlan, source_repo: Optional[str], endpoint: Optional[str]):
    """For a run that will publish: a valid repo id, a token that may write to its namespace, and a remote repo
    that is new or holds a conversion of the same source."""
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    repo = plan.upload_repo
    try:
        validate_repo_id(repo)
    except HFValidationError as e:
        raise ConvertError(f"--upload-repo {repo!r} is not a valid repo id ({str(e).splitlines()[0][:120]})") from None
    if "/" not in repo:
        raise ConvertError(f"--upload-repo {repo!r} needs a namespace: me/{repo} or org/{repo}")
    if plan.dry_run:
        return
    token = plan.token or get_token()
    if not token:
        raise ConvertError("publishing needs a Hugging Face token with write access: log in with `hf auth login` "
                           "or set HF_TOKEN (or drop --upload-repo)")
    api = HfApi(endpoint=endpoint, token=token)
    try:
        me = api.whoami()
    except Exception as e:  # noqa: BLE001  (any failure here means the token cannot be used)
        status = getattr(getattr(e, "response", None), "status_code", None)
        raise ConvertError("the Hub refused the token (check HF_TOKEN or `hf auth login`)" if status in (401, 403)
                           else f"cannot check the token with the Hub ({type(e).__name__}); check the network or "
                                "HF_ENDPOINT") from None
    check_namespace(repo, me)
    check_remote_holds_same_model(api, repo, source_repo, plan.overwrite)


def check_namespace(repo: str, me: dict):
    namespace = repo.split("/")[0]
    orgs = {o.get("name") for o in me.get("orgs", [])}
    if namespace != me.get("name") and namespace not in orgs:
        raise ConvertError(f"the token belongs to {me.get('name')!r}, which cannot publish to {namespace!r} (not "
                           "your user name nor one of your organisations)")
    role = ((me.get("auth") or {}).get("accessToken") or {}).get("role")
    if role == "read":
        raise ConvertError("the token is read-only: create a token with write access (huggingface.co/settings/"
                           "tokens) and log in with it")


def check_remote_holds_same_model(api, repo: str, source_repo: Optional[str], overwrite: bool):
    """An existing remote repo must hold a conversion of the same source (its card's base_model), or be empty."""
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        info = api.model_info(repo)
    except RepositoryNotFoundError:
        return
    files = {s.rfilename for s in info.siblings or []} - {".gitattributes"}
    if not files or overwrite:
        return
    card = getattr(info, "card_data", None) or {}
    base = card.get("base_model") if hasattr(card, "get") else None
    base = base[0] if isinstance(base, list) and base else base
    if source_repo is None or base != source_repo:
        held = f"a conversion of {base}" if base else f"{len(files)} files of another model"
        raise ConvertError(f"{repo} already holds {held}; publishing {source_repo or 'this local folder'} there "
                           "would replace it: choose another --upload-repo or pass --overwrite")
