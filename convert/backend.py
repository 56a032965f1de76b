"""The arithmetic the gate's MLX side runs on. Every float32 bound of the gate (exact-weights parity near 1e-5,
cache and batch consistency, the shadow model) assumes true float32 products. MLX's CUDA backend computes float32
matrix products at reduced precision (relative error ~3e-4 against float64, where true float32 gives ~6e-7) with no
switch for it, so a correct conversion would fail there, and looser bounds would let small conversion bugs through.
The gate therefore measures the default device once per run and, when its products are not true float32, runs its
MLX checks on the CPU device, which is; the report states the device and the precision measured."""

from dataclasses import asdict, dataclass

import numpy as np

TRUE_FLOAT32 = 1e-5  # relative error of a 256-deep float32 product: ~6e-7 in true float32


@dataclass(frozen=True)
class GateBackend:
    default: str  # the device MLX computes on by default
    default_precision: float  # its float32 product's relative error against float64
    device: str  # the device the gate's MLX checks run on
    precision: float
    note: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def matmul_precision(device) -> float:
    """Relative error (max over entries, against float64) of a float32 product of random 256x256 matrices."""
    import mlx.core as mx

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((256, 256)).astype(np.float32), rng.standard_normal((256, 256)).astype(np.float32)
    with mx.stream(device):
        ours = np.array(mx.array(a) @ mx.array(b))
    exact = a.astype(np.float64) @ b.astype(np.float64)
    return float(np.abs(ours - exact).max() / np.abs(exact).max())


def choose(default=None, probe=matmul_precision) -> GateBackend:
    """Where the gate's MLX checks run: the default device if its float32 is true float32, else the CPU."""
    import mlx.core as mx

    default = default if default is not None else mx.default_device()
    precision = probe(default)
    if precision <= TRUE_FLOAT32 or default == mx.cpu:
        return GateBackend(str(default), precision, str(default), precision)
    cpu = probe(mx.cpu)
    note = (f"the {default} device's float32 products have relative error {precision:.1e} (true float32: "
            f"{cpu:.0e}); the gate's MLX checks ran on the CPU, in true float32")
    return GateBackend(str(default), precision, str(mx.cpu), cpu, note)


def device_of(backend: GateBackend):
    import mlx.core as mx

    return mx.cpu if backend.device == str(mx.cpu) else mx.default_device()
