"""A decoder layer's decode work around attention, in two compiled calls instead of about fifteen
Python steps.

For the n new rows x [n, d_model] of a decode step (one token per sequence, n ≤ 64):

    before attention    x̂ = RMSNorm(x)
                        q, k, v = x̂ W_qᵀ, x̂ W_kᵀ, x̂ W_vᵀ            [n, H·D], [n, KV·D], [n, KV·D]
                        q, k = RMSNorm_head(q), RMSNorm_head(k)       Gemma 3's QK-norm, when given
                        q, k = RoPE(q), RoPE(k)                       at each row's position
    (attention: the caller writes k, v into the caches and attends, o [n, H·D])
    after attention     h = x + [RMSNorm_post](o W_oᵀ)                in place in x
                        x̂ = RMSNorm(h)
                        m = W_down(act(x̂ W_gateᵀ) ⊙ x̂ W_upᵀ)         SwiGLU (llama) or GeGLU (Gemma)
                        x = h + [RMSNorm_post](m)

Each step is the kernel the unfused path runs, called in the same order on the same values, so a
fused step's logits equal the unfused step's bit for bit (tests/test_decode_layer.py). What fusing
removes is the Python between kernels — temporaries, reshapes, dispatch — which was a fifth of a
SmolLM2 decode step at depth 0 (BENCHMARKS.md, "Where SmolLM2 decode time goes").

A weight matrix is passed as a tuple ``(codes, scales, mins, quads)`` in the 4-bit affine layout
(Q4_1, Q4_K) or ``(codes, scales, None, quads)`` in the int8 layout (Q8_0, Q5_0, Q6_K) — see
:mod:`mqa_gen.kernels.quant`; ``quads`` is None, or the codes in the row-quad layout when int8 dot
products are on (:mod:`mqa_gen.kernels.int8_dot`: the rows are rounded to 8 bits once per input
and the products multiply integers). Numba compiles one specialisation per mix of layouts and dtypes:
``mins is None`` is known when a specialisation is typed, so each keeps only its own kernels. The
optional norms and the RoPE tables are likewise None or arrays.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit

from .flags import FASTMATH
from .int8_dot import no_tiles as _no_tiles, product as int8_product, products as int8_products, quantized
from .quant import int8_matmul, int8_matvec, int8_matvec3, q4_1_matmul, q4_1_matvec, q4_1_matvec3
from .rowwise import geglu_tanh, rmsnorm, rope, swiglu

# These functions run parallel kernels from compiled code, which skips the kernels' dispatchers —
# and a dispatcher is what starts Numba's worker threads. Loaded from the disk cache into a
# process that has run no parallel kernel yet, the first call would jump into a thread pool that
# does not exist (a segmentation fault, Numba 0.68). Asking for the thread count starts the pool.
numba.get_num_threads()


@njit(cache=True, fastmath=FASTMATH)
def _product_of(codes, scales, mins, quads, x, y):
    """y = x Wᵀ for x float32 [n, cols], y float32 [n, rows]: the matrix × vector kernel for one
    row, the few-rows kernel otherwise (as :class:`mqa_gen.linear.QuantizedLinear` chooses), or
    the integer kernel when ``quads`` is given. ``mins is None`` (the int8 layout) and ``quads is
    None`` are tests Numba settles when it compiles: the weights are separate arguments here so
    that it can."""
    if quads is not None:
        qx, dx, qsum = quantized(x)
        int8_product(quads, scales, mins, qx, dx, qsum, y)
    elif mins is None:
        if x.shape[0] == 1:
            int8_matvec(codes, scales, x[0], y[0])
        else:
            int8_matmul(codes, scales, x, y)
    else:
        if x.shape[0] == 1:
            q4_1_matvec(codes, scales, mins, x[0], y[0])
        else:
            q4_1_matmul(codes, scales, mins, x, y)


@njit(cache=True, fastmath=FASTMATH)
def _product(w, x, y):
    """y = x Wᵀ for a weight tuple w (module docstring)."""
    _product_of(w[0], w[1], w[2], w[3], x, y)


@njit(cache=True, fastmath=FASTMATH)
def _fused(ca, sa, ma, cb, sb, mb, cc, sc, mc, x, ya, yb, yc):
    """One row through two or three matrices of one layout in one parallel region (as
    :class:`mqa_gen.linear.FusedProjections`); returns False, doing nothing, when x has several
    rows or the layouts differ (decided when compiled, as in :func:`_product_of`)."""
    if x.shape[0] != 1:
        return False
    if ma is not None:
        if mb is not None:
            if mc is not None:
                q4_1_matvec3(ca, sa, ma, ya[0], cb, sb, mb, yb[0], cc, sc, mc, yc[0], x[0])
                return True
    if ma is None:
        if mb is None:
            if mc is None:
                int8_matvec3(ca, sa, ya[0], cb, sb, yb[0], cc, sc, yc[0], x[0])
                return True
    return False


@njit(cache=True, fastmath=FASTMATH)
def _int8_fused(qa, sa, ma, qb, sb, mb, qc, sc, mc, x, ya, yb, yc):
    """The integer kernels' :func:`_fused`: x rounded to 8 bits once, then two or three matrices of
    one layout in one parallel region, for any number of rows; False, doing nothing, unless every
    matrix has row-quad codes and all share a layout (decided when compiled)."""
    if qa is None or qb is None or qc is None:
        return False
    if (ma is None) != (mb is None) or (ma is None) != (mc is None):
        return False
    qx, dx, qsum = quantized(x)
    int8_products(qa, sa, ma, ya, qb, sb, mb, yb, qc, sc, mc, yc, qx, dx, qsum)
    return True


@njit(cache=True, fastmath=FASTMATH)
def _three_products(wa, wb, wc, x, ya, yb, yc):
    """ya, yb, yc = x Waᵀ, x Wbᵀ, x Wcᵀ: one parallel region for one row and three matrices of
    one layout (or any rows, with int8 dot products on), one product each otherwise."""
    if _int8_fused(wa[3], wa[1], wa[2], wb[3], wb[1], wb[2], wc[3], wc[1], wc[2], x, ya, yb, yc):
        return
    if not _fused(wa[0], wa[1], wa[2], wb[0], wb[1], wb[2], wc[0], wc[1], wc[2], x, ya, yb, yc):
        _product(wa, x, ya)
        _product(wb, x, yb)
        _product(wc, x, yc)


@njit(cache=True, fastmath=FASTMATH)
def _is_given(a):
    """``a is not None``, settled when compiled (a tuple's item is not an argument Numba prunes on)."""
    return a is not None


@njit(cache=True, fastmath=FASTMATH)
def _two_products(wa, wb, x, ya, yb):
    """ya, yb = x Waᵀ, x Wbᵀ; for one row of two matrices of one layout the three-matrix kernel's
    third slot gets 0-tile slices of the first (as FusedProjections passes). With int8 dot
    products on, two products (:func:`_product`): the integer kernels' fused call with a third slot
    made of slices here left an exception pending at random steps of Gemma 3's decode (Numba
    0.68; not seen with three real matrices, nor with the slots' arrays passed from Python)."""
    if _is_given(wa[3]):
        _product(wa, x, ya)
        _product(wb, x, yb)
        return
    if not _fused(wa[0], wa[1], wa[2], wb[0], wb[1], wb[2], wa[0][:0], wa[1][:0], _no_tiles(wa[2]),
                       x, ya, yb, ya[:, :0]):
        _product(wa, x, ya)
        _product(wb, x, yb)


@njit(cache=True, fastmath=FASTMATH)
def before_attention(x, attn_norm, eps, wq, wk, wv, q_norm, k_norm, head_eps, cos, sin, interleaved,
                     x_normed, q, k, v):
    """RMSNorm, the q/k/v projections, QK-norm and RoPE for the n decode rows (module docstring).

    x: float32 [n, d_model] (read only); attn_norm: float32 [d_model]; eps, head_eps: floats.
    wq, wk, wv: weight tuples (module docstring). q_norm, k_norm: float32 [head_dim] or None.
    cos, sin: float32 [n, head_dim/2] (each row's RoPE angles) or None for no RoPE; interleaved:
    the pair order (see :func:`~mqa_gen.kernels.rowwise.rope`).
    Outputs, overwritten: x_normed float32 [n, d_model] (scratch), q [n, H, head_dim],
    k and v [n, KV, head_dim], all float32 and C-contiguous.
    """
    n, H, D = q.shape
    KV = k.shape[1]
    rmsnorm(x, attn_norm, eps, x_normed)
    q2, k2, v2 = q.reshape(n, H * D), k.reshape(n, KV * D), v.reshape(n, KV * D)
    _three_products(wq, wk, wv, x_normed, q2, k2, v2)
    if q_norm is not None:
        rmsnorm(q.reshape(n * H, D), q_norm, head_eps, q.reshape(n * H, D))
    if k_norm is not None:
        rmsnorm(k.reshape(n * KV, D), k_norm, head_eps, k.reshape(n * KV, D))
    if cos is not None:
        rope(q, cos, sin, interleaved)
        rope(k, cos, sin, interleaved)


@njit(cache=True, fastmath=FASTMATH)
def after_attention(x, o, wo, post_attn_norm, mlp_norm, eps, w_gate, w_up, w_down, post_mlp_norm, gelu,
                    attn_out, x_normed, gate, up, mlp_out):
    """W_o, the residual, RMSNorm, the gated MLP and its residual for the n decode rows, in place in x.

    x: float32 [n, d_model], overwritten with the layer's output. o: float32 [n, H·head_dim], the
    attention heads' outputs. wo, w_gate, w_up, w_down: weight tuples. mlp_norm: float32
    [d_model]; post_attn_norm, post_mlp_norm: float32 [d_model] or None (Gemma 3 has them);
    eps: float. gelu: True for GeGLU-tanh (Gemma), False for SwiGLU (llama).
    Scratch, overwritten: attn_out, x_normed, mlp_out float32 [n, d_model]; gate, up float32 [n, d_ff].
    """
    n, d = x.shape
    _product(wo, o, attn_out)
    if post_attn_norm is not None:
        rmsnorm(attn_out, post_attn_norm, eps, attn_out)
    for r in range(n):
        for i in range(d):
            x[r, i] += attn_out[r, i]
    rmsnorm(x, mlp_norm, eps, x_normed)
    _two_products(w_gate, w_up, x_normed, gate, up)
    if gelu:
        geglu_tanh(gate, up)  # up ← act(gate) ⊙ up
    else:
        swiglu(gate, up)
    _product(w_down, up, mlp_out)
    if post_mlp_norm is not None:
        rmsnorm(mlp_out, post_mlp_norm, eps, mlp_out)
    for r in range(n):
        for i in range(d):
            x[r, i] += mlp_out[r, i]


#: The weight-type mixes of the models mqa-gen ships, as the warm-up compiles them: per model,
#: (W_q, W_k, W_v) types, then the (W_o, W_gate, W_up, W_down) types of each kind of layer. Only
#: layouts and dtypes matter to Numba: Q5_0 stands for Q8_0 too (both int8 codes, float16 scales).
SHIPPED_MIXES = {
    "SmolLM2 Q4_1": (("Q4_1",) * 3, [("Q4_1",) * 4]),
    "Gemma 3 Q4_K_M": (("Q5_0",) * 3, [("Q4_K", "Q5_0", "Q5_0", "Q6_K"), ("Q4_K", "Q5_0", "Q5_0", "Q4_K")]),
}


def warm_up(int8_dot: bool = False) -> None:
    """Compile (or load) the step for each of :data:`SHIPPED_MIXES` on tiny matrices, with the
    optional parts each model has (Gemma 3: QK-norm, post-norms, GeGLU); with ``int8_dot``, the
    step with row-quad codes (``--int8-dot``) instead. A model with another mix compiles its own
    on its first decode step, once; the disk cache keeps it."""
    from .int8_dot import row_quads

    from .quant import TILE, repack_q4_1, repack_q4_k, repack_q5_0, repack_q6_k

    f32 = np.float32
    d, n_heads, head_dim = 256, 2, 128  # d_model = d_ff, H = KV: whole tiles and K-quant blocks
    block_bytes = {"Q4_1": (repack_q4_1, 32, 20), "Q5_0": (repack_q5_0, 32, 22),
                   "Q4_K": (repack_q4_k, 256, 144), "Q6_K": (repack_q6_k, 256, 210)}

    def matrix(type_name):
        repack, block, nbytes = block_bytes[type_name]
        packed = repack(np.zeros((TILE, d // block * nbytes), np.uint8), TILE, d)
        quads = row_quads(packed[0]) if int8_dot else None
        return (*packed, quads) if len(packed) == 3 else (*packed, None, quads)

    def gain(size=d):
        g = np.ones(size, f32)
        g.flags.writeable = False  # norm gains are read-only views of the GGUF mapping
        return g

    for name, (qkv, mlp_mixes) in SHIPPED_MIXES.items():
        gemma = name.startswith("Gemma")
        head_gain = gain(head_dim) if gemma else None
        for n in (1, 2):  # one sequence (the three-matrix kernel) and a batch: the same types
            x, normed = np.ones((n, d), f32), np.empty((n, d), f32)
            q, k, v, o = (np.empty((n, n_heads, head_dim), f32) for _ in range(4))
            cos, sin = np.ones((n, head_dim // 2), f32), np.zeros((n, head_dim // 2), f32)
            before_attention(x, gain(), 1e-6, *(matrix(t) for t in qkv), head_gain, head_gain, 1e-6, cos, sin, not gemma, normed, q, k, v)
            for wo, w_gate, w_up, w_down in mlp_mixes:
                after_attention(x, o.reshape(n, -1), matrix(wo), gain() if gemma else None, gain(), 1e-6,
                                matrix(w_gate), matrix(w_up), matrix(w_down), gain() if gemma else None, gemma,
                                np.empty((n, d), f32), normed, np.empty((n, d), f32), np.empty((n, d), f32),
                                np.empty((n, d), f32))
