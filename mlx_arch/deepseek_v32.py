"""DeepSeek-V3.2(-Exp), mirroring transformers/models/deepseek_v32/modeling_deepseek_v32.py: DeepSeek-V3 with DeepSeek
Sparse Attention: each layer's indexer (core/mla.py `Indexer`: `index_n_heads` heads of `index_head_dim`, RoPE on
their first `qk_rope_head_dim` features by halves) lets every query attend only to its `index_topk` best-scored
earlier tokens. The query is always low-rank (`q_lora_rank`); dense or sparse MLPs per `mlp_layer_types` (by default
the first `first_k_dense_replace` layers dense); `layer_types` are all "indexed_attention" (full attention through a
KVCache that also holds the indexer's keys). transformers keeps `indexer.weights_proj` in float32; so does the
quantization here (like a router), while a cast follows the model's dtype."""

from dataclasses import dataclass
from typing import Optional

from . import deepseek_v3
from .core.kinds import FULL, LayerKind
from .core.mla import Indexer, LatentAttention
from .core.rope import initialize_rope


@dataclass
class ModelArgs(deepseek_v3.ModelArgs):
    max_position_embeddings: Optional[int] = 163840
    num_experts: Optional[int] = None
    mlp_layer_types: Optional[list] = None
    index_topk: int = 2048
    index_head_dim: int = 128
    index_n_heads: int = 64
    indexer_rope_interleave = False  # by halves (GLM-MoE-DSA: interleaved)

    def __post_init__(self):
        super().__post_init__()
        if self.num_experts is not None:
            self.n_routed_experts = self.num_experts
        if self.q_lora_rank is None:
            raise ValueError(f"{self.model_type} needs q_lora_rank: its indexer reads the low-rank query")
        self.rope_interleave = True  # the config class removes the key: the MLA rotation is always interleaved
        for t in self.layer_types or []:
            if t != "indexed_attention":
                raise ValueError(f"{self.model_type} layer_types must all be 'indexed_attention', got {t!r}")


class Model(deepseek_v3.Model):
    def layer_kinds(self) -> list:
        return [FULL] * self.args.num_hidden_layers  # indexed attention caches like full attention

    def indexer(self, index: int) -> Optional[Indexer]:
        a = self.args
        rope = initialize_rope(a.qk_rope_head_dim, a.rope_theta, a.indexer_rope_interleave, a.rope_scaling,
                               a.max_position_embeddings)
        return Indexer(a.hidden_size, a.q_lora_rank, a.index_n_heads, a.index_head_dim, a.index_topk, rope)

    def attention(self, index: int, kind: LayerKind, indexer=None) -> LatentAttention:
        return super().attention(index, kind, indexer=self.indexer(index))
