"""Every architecture case of tests/data/model_configs.json, in both config styles, checked by value."""

import pytest

from model_test_runner import (build_case, case_params, check_batch_vs_single, check_cache_vs_full,
                               check_fp16_close, check_parity, check_sanitize_idempotent, probe_tokens)


@pytest.mark.parametrize("case,style", case_params())
def test_model(tmp_path, case, style):
    path, model, config, weights = build_case(tmp_path, case, style)
    tokens = probe_tokens(config["vocab_size"], case.get("seq_len", 12))
    check_sanitize_idempotent(model, weights)
    check_parity(path, model, tokens)
    check_cache_vs_full(model, tokens)
    check_batch_vs_single(model, tokens)
    check_fp16_close(model, tokens)
