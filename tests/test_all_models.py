"""Every architecture module in mlx_arch has a test configuration."""

import mlx_arch
from model_test_runner import CASES


def test_every_architecture_has_a_test_config():
    covered = {case["model_type"] for case in CASES}
    missing = sorted(set(mlx_arch.supported_model_types()) - covered)
    assert not missing, f"architectures without a case in tests/data/model_configs.json: {missing}"


def test_every_module_defines_model_and_args():
    for name in mlx_arch.architecture_modules():
        arch = mlx_arch.get_architecture(name)
        assert hasattr(arch, "Model") and hasattr(arch, "ModelArgs"), name


def test_unknown_model_type_names_supported_ones():
    import pytest

    with pytest.raises(mlx_arch.UnsupportedArchitecture, match="supported: .*llama"):
        mlx_arch.get_architecture("no_such_model")
