"""Shared building blocks of every architecture: config styles, masks and attention (`base`), layer kinds
(`kinds`), caches, RoPE, decoder blocks (`layers`), mixture-of-experts blocks (`moe`), weight-layout operations
(`weights`) and the quantized/float module pairs (`quant`). Nothing here is a model type; every module directly in `mlx_arch/` is one."""
