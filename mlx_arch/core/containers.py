"""Multimodal containers: checkpoints whose `model_type` is the container's (gemma3, mistral3, ...), whose text
model's config sits under `text_config` and whose weights hold the language model under a prefix beside vision /
audio towers and their projectors. mlx-convert publishes the text model alone.

One table, data only: per container type, the text type when `text_config` does not name one, the container keys
the text model takes from the top level (transformers builds the container from the top-level config: e.g. its
`tie_word_embeddings` ties the head, whatever `text_config` says), the language model's weight prefixes (renamed to
the text model's names; other spellings of older exports as aliases), and the prefixes of the other towers, dropped
by rule and reported.
"""

from dataclasses import dataclass, field
from typing import Optional

from .weights import Alias, Identity, Op, Rename


@dataclass(frozen=True)
class Container:
    model_type: str
    text_type: str  # transformers' default text sub-config, when `text_config` has no model_type
    dropped: tuple  # weight prefixes of the other towers and projectors
    inherited: dict = field(default_factory=dict)  # top-level keys the text model takes, with the container's default
    # canonical checkpoint prefix of the language model -> the text model's own; other spellings -> canonical
    rename: dict = field(default_factory=lambda: {"model.language_model.": "model."})
    aliases: dict = field(default_factory=lambda: {"language_model.model.": "model.language_model.",
                                                   "language_model.lm_head.": "lm_head."})

    def rules(self) -> list:
        """Weight rules from the container's checkpoint names to the text model's (they run before the text
        model's own rules)."""
        return [DropPrefixes(self.dropped, why=f"{self.model_type}: not the text model"), Alias(self.aliases),
                MovePrefixes(self.rename)]


class MovePrefixes(Rename):
    """Rename by literal prefixes (longest first, one pass) where a name may extend its new name: the language
    model's `model.language_model.` -> `model.` is idempotent (a renamed key no longer starts with the long prefix),
    and its inverse, `model.` -> `model.language_model.`, runs once, on the output's names."""

    def __init__(self, table: dict):
        self.table = dict(table)
        self._order = sorted(self.table, key=len, reverse=True)

    def inverse(self):
        return MovePrefixes({v: k for k, v in self.table.items()})


class DropPrefixes(Op):
    """Discard every key under the given prefixes (a whole tower). Lossy by declaration; `dropped(key)` says so."""

    lossy = True

    def __init__(self, prefixes: tuple, why: str = ""):
        self.prefixes, self.why = tuple(prefixes), why

    def dropped(self, key):
        return key.startswith(self.prefixes)

    def apply(self, w):
        return {k: v for k, v in w.items() if not self.dropped(k)}

    def inverse(self):
        return Identity()


def _towers(*names: str) -> tuple:
    """Each tower's prefix in the layout transformers 5 saves (`model.<tower>.`) and in older exports (bare)."""
    return tuple(p for n in names for p in (f"model.{n}.", f"{n}."))


TIED = {"tie_word_embeddings": True}
UNTIED = {"tie_word_embeddings": False}

CONTAINERS = {c.model_type: c for c in (
    Container("gemma3", "gemma3_text", _towers("vision_tower", "multi_modal_projector"), TIED),
    Container("mistral3", "mistral", _towers("vision_tower", "multi_modal_projector"), TIED),
    # Llama4ForConditionalGeneration holds a whole Llama4ForCausalLM, tied (or not) by its own text config
    Container("llama4", "llama4_text", _towers("vision_model", "multi_modal_projector"), {},
              rename={"language_model.model.": "model.", "language_model.lm_head.": "lm_head."},
              aliases={"model.language_model.": "language_model.model."}),
    Container("gemma4", "gemma4_text", _towers("vision_tower", "audio_tower", "embed_vision", "embed_audio"), TIED),
    Container("qwen3_5", "qwen3_5_text", _towers("visual"), UNTIED),
    Container("qwen3_5_moe", "qwen3_5_moe_text", _towers("visual"), UNTIED),
)}


def container_of(config: dict) -> Optional[Container]:
    """The table's entry for a config's model_type, or None (a plain text model, or a container we do not know)."""
    return CONTAINERS.get(config.get("model_type")) if isinstance(config.get("text_config"), dict) else None


def text_type(config: dict) -> str:
    container = container_of(config)
    return config["text_config"].get("model_type") or container.text_type


# Top-level keys of a container that every text model keeps: how the checkpoint is stored.
_STORAGE = ("dtype", "torch_dtype", "quantization", "quantization_config", "transformers_version")


def text_config(config: dict) -> dict:
    """A known container's text model config: `text_config` (its model_type defaulted as transformers does), the
    container's storage keys, and the keys the table says the text model takes from the top level: the container's
    value (transformers builds the container from its own config), else the text config's, else the container
    class's default. (transformers 5 also leaves a head untied when the checkpoint holds it with its own values
    although the container's default says tied, as Mistral 3 releases do: stating no top-level key, they fall back
    on `text_config`'s here.)"""
    container = container_of(config)
    inner = {"model_type": container.text_type, **config["text_config"]}
    storage = {k: config[k] for k in _STORAGE if k in config and k not in inner}
    taken = {k: config[k] if k in config else inner.get(k, default) for k, default in container.inherited.items()}
    return {**storage, **inner, **taken}


def dropped_weights(config: dict, weights: dict) -> Optional[dict]:
    """What a container checkpoint loses to its text model: {"container", "text_model", "count", "bytes",
    "prefixes"} of the weights that are not the text model's; None for a plain checkpoint. `weights`: {name: array}
    (lazy arrays are not read)."""
    container = container_of(config)
    if container is None:
        return None
    drop = container.rules()[0]
    gone = [v for k, v in weights.items() if drop.dropped(k)]
    return {"container": container.model_type, "text_model": text_type(config), "count": len(gone),
            "bytes": int(sum(v.nbytes for v in gone)),
            "prefixes": sorted({p for p in container.dropped if any(k.startswith(p) for k in weights)})}


def describe(dropped: dict) -> str:
    """One line for the log and the card."""
    return (f"text model `{dropped['text_model']}` of the multimodal checkpoint `{dropped['container']}`: dropped "
            f"{dropped['count']} vision/audio/projector tensors ({dropped['bytes'] / 1e6:,.1f} MB; "
            f"{', '.join(dropped['prefixes']) or 'none found'})")
