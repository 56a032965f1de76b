"""GLM (GLM-4-9B, the first GLM in transformers), mirroring transformers/models/glm/modeling_glm.py: GLM-4-0414's
attention and fused `gate_up_proj` MLP (see glm4.py) in llama's plain pre-norm blocks (`input_layernorm`,
`post_attention_layernorm`) instead of GLM-4-0414's sandwich."""

from dataclasses import dataclass

from . import glm4, llama


@dataclass
class ModelArgs(glm4.ModelArgs):
    pass  # GlmConfig's fields and defaults are Glm4Config's


class Model(glm4.Model):
    layer = llama.Model.layer
