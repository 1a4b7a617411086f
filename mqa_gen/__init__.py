"""mqa-gen: text generation with Multi-Query Attention, Numba kernels and a measured KV cache."""

__version__ = "0.1.0"

__all__ = ["MultiQueryAttention", "MultiQueryAttentionConfig"]


def __getattr__(name: str):
    # Lazy: ``import mqa_gen`` stays light; the layer (and Numba) load on first use.
    if name in __all__:
        from . import layer

        return getattr(layer, name)
    raise AttributeError(f"module 'mqa_gen' has no attribute {name!r}")
