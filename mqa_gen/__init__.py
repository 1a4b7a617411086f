"""mqa-gen: text generation with Multi-Query Attention, Numba kernels and a measured KV cache."""

__version__ = "0.1.0"
