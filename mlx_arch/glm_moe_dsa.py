"""GLM-MoE-DSA (GLM-5), mirroring transformers/models/glm_moe_dsa/modeling_glm_moe_dsa.py: DeepSeek-V3.2 with GLM's
defaults and its indexer rotating interleaved pairs. `indexer_types` says per layer whether the layer runs its own
indexer ("full") or reuses the previous full layer's choice ("shared"); configs may state it instead as
`index_topk_pattern` ("F"/"S" per layer) or `index_topk_freq` / `index_skip_topk_offset`, read here as
GlmMoeDsaConfig reads them. Shared layers are refused for now (they need the choice carried from layer to layer);
with the default frequency of one, every layer is full. mlx-lm's glm_moe_dsa requires `topk_method`, `scoring_func`,
`moe_layer_freq` and `rope_parameters`, and reads `first_k_dense_replace`: the export writes them."""

from dataclasses import dataclass
from typing import Optional, Union

from . import deepseek_v32


def indexer_types(n_layers: int, pattern: Optional[Union[str, list]], freq: Optional[int], offset: Optional[int]):
    """GlmMoeDsaConfig's derivation when `indexer_types` is absent."""
    if pattern is not None:
        return [{"F": "full", "S": "shared"}[c] for c in pattern] if isinstance(pattern, str) else list(pattern)
    freq, offset = max(freq or 1, 1), 2 if offset is None else offset
    return ["full" if max(i - offset + 1, 0) % freq == 0 else "shared" for i in range(n_layers)]


@dataclass
class ModelArgs(deepseek_v32.ModelArgs):
    vocab_size: int = 154880
    hidden_size: int = 6144
    intermediate_size: int = 12288
    num_hidden_layers: int = 78
    num_attention_heads: int = 64
    num_key_value_heads: Optional[int] = 64
    q_lora_rank: Optional[int] = 2048
    v_head_dim: int = 256
    qk_nope_head_dim: int = 192
    n_group: Optional[int] = 1
    topk_group: Optional[int] = 1
    max_position_embeddings: Optional[int] = 202752
    rms_norm_eps: float = 1e-5
    index_n_heads: int = 32
    indexer_types: Optional[list] = None
    index_topk_pattern: Optional[Union[str, list]] = None
    index_topk_freq: Optional[int] = None
    index_skip_topk_offset: Optional[int] = None
    indexer_rope_interleave = True

    def __post_init__(self):
        super().__post_init__()
        if self.indexer_types is None:
            self.indexer_types = indexer_types(self.num_hidden_layers, self.index_topk_pattern, self.index_topk_freq,
                                               self.index_skip_topk_offset)
        shared = [i for i, t in enumerate(self.indexer_types[: self.num_hidden_layers]) if t != "full"]
        if shared:
            raise ValueError(f"glm_moe_dsa layers {shared[:5]} reuse another layer's sparse-attention choice "
                             "(indexer_types 'shared'), which mlx-convert does not implement yet; only configs whose "
                             "layers all run their own indexer convert")


class Model(deepseek_v32.Model):
    def export_config(self, config: dict) -> dict:
        """mlx-lm's glm_moe_dsa requires keys of the released configs that transformers 5 does not write."""
        a = self.args
        rope = config.get("rope_parameters") or {"rope_type": "default", **(a.rope_scaling or {}),
                                                 "rope_theta": a.rope_theta}
        return {"topk_method": "noaux_tc", "scoring_func": "sigmoid", "moe_layer_freq": 1,
                **super().export_config(config), "rope_parameters": rope}
