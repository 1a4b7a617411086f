"""KV-head counts: one MQA/GQA/MHA label and one regrouping check for every caller."""

from __future__ import annotations

import numpy as np
import pytest

from mqa_gen.config import ModelConfig
from mqa_gen.errors import ConfigError
from mqa_gen.kv_heads import attention_kind, check_kv_heads, valid_kv_heads
from mqa_gen.layer import MultiQueryAttentionConfig
from mqa_gen.regroup import regroup_kv_projection


@pytest.mark.parametrize(("n_heads", "n_kv_heads", "kind"), [
    (9, 1, "MQA"), (9, 3, "GQA"), (9, 9, "MHA"), (8, 2, "GQA"), (8, 4, "GQA"), (1, 1, "MQA"), (4, 1, "MQA"),
])
def test_attention_kind_and_the_config_properties_agree(n_heads, n_kv_heads, kind):
    assert attention_kind(n_heads, n_kv_heads) == kind
    layer = MultiQueryAttentionConfig(num_heads=n_heads, head_dim=4, num_kv_heads=n_kv_heads)
    assert layer.kind == kind
    config = ModelConfig(architecture="llama", name="tiny", n_layers=1, d_model=n_heads * 4, n_heads=n_heads,
                         n_kv_heads=n_kv_heads, head_dim=4, d_ff=8, vocab_size=10, context_length=16,
                         rope_theta=10_000.0, norm_eps=1e-5, tie_embeddings=True)
    assert config.attention_kind == kind


def regroupable(n_heads: int, native: int, target: int) -> bool:
    """The reference: ``target`` divides n_heads (every query head reads one KV head) and
    regroup_kv_projection can build its projection from ``native`` heads."""
    if n_heads % target:
        return False
    try:
        regroup_kv_projection(np.zeros((native * 2, 3), np.float32), native, target, 2)
    except ValueError:
        return False
    return True


@pytest.mark.parametrize(("n_heads", "native"), [(9, 3), (8, 2), (12, 4), (16, 16), (16, 1), (6, 6)])
def test_valid_kv_heads_are_exactly_the_counts_regrouping_can_reach(n_heads, native):
    expected = [n for n in range(1, n_heads + 1) if regroupable(n_heads, native, n)]
    assert valid_kv_heads(n_heads, native) == expected
    assert 1 in expected and native in expected and n_heads in expected


def test_check_accepts_valid_counts_and_names_the_bad_ones():
    check_kv_heads(9, 3, 1)
    check_kv_heads(9, 3, [1, 3, 9])
    with pytest.raises(ConfigError) as one:
        check_kv_heads(9, 3, 2)
    assert str(one.value) == ("--kv-heads 2 is not valid for this model (n_heads=9, native n_kv_heads=3); "
                              "valid: 1, 3, 9")
    with pytest.raises(ConfigError) as several:
        check_kv_heads(8, 2, [1, 3, 4, 5])
    assert str(several.value) == ("--kv-heads 3,5 are not valid for this model (n_heads=8, native n_kv_heads=2); "
                                  "valid: 1, 2, 4, 8")
    with pytest.raises(ConfigError):
        check_kv_heads(8, 2, np.int64(3))  # a NumPy integer counts as one count
