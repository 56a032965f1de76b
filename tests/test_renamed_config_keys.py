"""Config keys that older checkpoints name differently and transformers 5 still reads.

The case table covers gpt_neox's `rotary_pct` / `rotary_emb_base` in its v4 style; here the keys that transformers 4
already wrote under their new names but the oldest Hub configs still carry.
"""

import json

from checkpoints import make_checkpoint
from model_test_runner import check_parity, load_hf_folder, probe_tokens
from mlx_arch.gpt_neox import ModelArgs as NeoXArgs


def test_falcon_n_embed(tmp_path):
    path = make_checkpoint(tmp_path / "falcon", "falcon", tokenizer=False, new_decoder_architecture=True,
                           num_kv_heads=2)
    config = json.loads((path / "config.json").read_text())
    config["n_embed"] = config.pop("hidden_size")
    (path / "config.json").write_text(json.dumps(config))
    model, config, _ = load_hf_folder(path)
    check_parity(path, model, probe_tokens(config["vocab_size"], 10))


def test_gpt_neox_precedence():
    """rotary_emb_base / rotary_pct fill in what `rope_scaling` does not state, with GPTNeoXConfig's defaults."""
    base = {"model_type": "gpt_neox", "rotary_emb_base": 20000, "rotary_pct": 0.5}
    args = NeoXArgs.from_dict(base)
    assert (args.rope_theta, args.partial_rotary_factor, args.rope_scaling) == (20000, 0.5, None)
    args = NeoXArgs.from_dict({**base, "rope_scaling": {"type": "linear", "factor": 2.0, "rope_theta": 5000}})
    assert (args.rope_theta, args.rope_scaling["rope_type"]) == (5000, "linear")
    args = NeoXArgs.from_dict({"model_type": "gpt_neox"})
    assert (args.rope_theta, args.partial_rotary_factor) == (10000.0, 0.25)
