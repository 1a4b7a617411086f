"""KV-head counts: the MQA/GQA/MHA name of a grouping, and the groupings a model can be regrouped to.

With ``n_heads`` query heads and ``n_kv_heads`` K/V heads, query head h reads KV head
h // (n_heads / n_kv_heads). One KV head is multi-query attention (Shazeer 2019, "Fast Transformer
Decoding: One Write-Head is All You Need"), one per query head is multi-head attention, anything
between is grouped-query attention (Ainslie et al. 2023, "GQA").

A model with ``native`` KV heads can be regrouped (``mqa_gen.regroup``) exactly by replicating
heads (a multiple of native that divides n_heads) or approximately by mean-pooling consecutive
heads (a divisor of native); :func:`valid_kv_heads` lists both, :func:`check_kv_heads` enforces it.
"""

from __future__ import annotations

from collections.abc import Iterable

from .errors import ConfigError


def attention_kind(n_heads: int, n_kv_heads: int) -> str:
    """``"MQA"`` (one KV head), ``"MHA"`` (one per query head) or ``"GQA"`` (anything between)."""
    if n_kv_heads == 1:
        return "MQA"
    return "MHA" if n_kv_heads == n_heads else "GQA"


def valid_kv_heads(n_heads: int, native: int) -> list[int]:
    """KV-head counts reachable from ``native``, ascending: divisors of it, and multiples of it
    dividing ``n_heads`` (SmolLM2-135M, 9 heads and 3 KV heads: [1, 3, 9])."""
    return [n for n in range(1, n_heads + 1)
            if n_heads % n == 0 and (native % n == 0 or n % native == 0)]


def check_kv_heads(n_heads: int, native: int, requested: int | Iterable[int]) -> None:
    """Refuse a ``--kv-heads`` count (or several) that :func:`valid_kv_heads` does not allow.

    Args:
        n_heads: the model's query heads. native: its own KV-head count.
        requested: one count, or several (each is checked).

    Raises:
        ConfigError: one line naming the bad counts, the model's head counts and the valid ones,
            e.g. ``--kv-heads 2 is not valid for this model (n_heads=9, native n_kv_heads=3);
            valid: 1, 3, 9``.
    """
    counts = list(requested) if isinstance(requested, Iterable) else [requested]
    valid = valid_kv_heads(n_heads, native)
    bad = [n for n in counts if n not in valid]
    if bad:
        verb = "is" if len(bad) == 1 else "are"
        raise ConfigError(f"--kv-heads {','.join(map(str, bad))} {verb} not valid for this model "
                          f"(n_heads={n_heads}, native n_kv_heads={native}); valid: {', '.join(map(str, valid))}")
