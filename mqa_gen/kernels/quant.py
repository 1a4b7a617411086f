"""Matrix × vector and small-batch matrix × matrix on GGUF-quantised weights, computed from the
packed blocks in float32.

Block formats (ggml, see ggml-common.h / the GGUF spec):
* Q4_1: 32 weights; fp16 scale d, fp16 minimum m, 16 bytes of 4-bit codes q; w = d·q + m. Byte i
  holds weight i in its low nibble and weight i + 16 in its high nibble.
* Q8_0: 32 weights; fp16 scale d, 32 int8 codes q; w = d·q.
* Q5_0: 32 weights; fp16 d, 32 high bits qh, 16 bytes of low nibbles; w = d·(q − 16), q in 0..31.
* Q4_K: super-blocks of 256 = 8 sub-blocks of 32; fp16 d and dmin, 6-bit scale sc and minimum m
  per sub-block; w = d·sc·q − dmin·m with 4-bit q.
* Q6_K: super-blocks of 256 = 16 sub-blocks of 16; int8 scale sc per sub-block, fp16 d, 6-bit q;
  w = d·sc·(q − 32).

At load time every type is repacked, exactly, into one of two in-memory layouts, and each layout
has one set of kernels:
* *4-bit affine* (Q4_1, Q4_K): per block of 32, a scale and a minimum and 16 bytes of nibbles
  in Q4_1's order — a Q4_K sub-block is a Q4_1 block with scale d·sc and minimum −dmin·m;
* *int8 symmetric* (Q8_0, Q5_0, Q6_K): per block, a scale and int8 codes (q − 16 for
  Q5_0, q − 32 for Q6_K); blocks of 32 weights, or of 16 for Q6_K (the kernels read the block
  length from the codes' shape).
Scales and minimums the file stores as float16 (Q4_1, Q8_0, Q5_0) stay float16 — uint16 bits,
converted as they are read (:func:`~mqa_gen.kernels.halfprec.as_float32`), so decode reads no
more bytes than the file holds; the K-quants' products d·sc are not float16 values and are
kept as float32. Numba compiles each kernel once per scale type.
Both are laid out as *row tiles* of ``TILE`` output rows side by side: codes [n_tiles, n_blocks,
bytes_per_block, TILE], scales [n_tiles, n_blocks, TILE]. The innermost loop then runs across the TILE rows with one x element
broadcast, which LLVM turns into wide SIMD; a per-row dot product over packed nibbles vectorises
poorly. The tile loops run to the tile width read from the array's shape, not a compile-time
constant: LLVM then vectorises them (with run-time alias checks) instead of unrolling them into
scalar code. Results equal dequantise-then-matmul up to float32 summation order.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .bits import high_nibble_f32, low_nibble_f32
from .flags import FASTMATH
from .halfprec import as_float32

#: Output rows per tile: 32 float32 lanes = two AVX-512 or four AVX2 registers of accumulators.
TILE = 32
BLOCK = 32  # weights per quantisation block (QK4_1 = QK8_0 = 32)


def tile_rows(a: np.ndarray, rows: int) -> np.ndarray:
    """[rows, nb, ...] → [n_tiles, nb, ..., TILE], zero-padding rows to a multiple of TILE."""
    pad = (-rows) % TILE
    if pad:
        a = np.concatenate([a, np.zeros((pad,) + a.shape[1:], a.dtype)])
    tiles = a.reshape((a.shape[0] // TILE, TILE) + a.shape[1:])
    order = (0,) + tuple(range(2, tiles.ndim)) + (1,)
    return np.ascontiguousarray(tiles.transpose(order))


def untile_rows(tiles: np.ndarray, rows: int) -> np.ndarray:
    """Inverse of :func:`tile_rows`: [n_tiles, nb, ..., TILE] → [rows, nb, ...]."""
    order = (0, tiles.ndim - 1) + tuple(range(1, tiles.ndim - 1))
    flat = tiles.transpose(order)
    return flat.reshape((-1,) + flat.shape[2:])[:rows]


def _fp16_bits(blocks: np.ndarray, offset: int) -> np.ndarray:
    """The fp16 field at byte ``offset`` of each block, as its uint16 bit pattern [rows, nb]."""
    return np.ascontiguousarray(blocks[:, :, offset:offset + 2]).view(np.uint16)[:, :, 0]


def repack_q4_1(raw: np.ndarray, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GGUF Q4_1 bytes uint8 [rows, cols/32·20] → (codes uint8 [n_tiles, nb, 16, TILE],
    scales [n_tiles, nb, TILE], minimums [n_tiles, nb, TILE]); scales and minimums stay the file's
    float16, as uint16 bits (5 bits a weight in memory, as in the file, not 6 with float32)."""
    blocks = np.asarray(raw, dtype=np.uint8).reshape(rows, cols // BLOCK, 20)
    return tile_rows(blocks[:, :, 4:20], rows), tile_rows(_fp16_bits(blocks, 0), rows), \
        tile_rows(_fp16_bits(blocks, 2), rows)


def repack_q8_0(raw: np.ndarray, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """GGUF Q8_0 bytes uint8 [rows, cols/32·34] → (codes int8 [n_tiles, nb, 32, TILE],
    scales [n_tiles, nb, TILE] as the file's float16 bits, uint16)."""
    blocks = np.asarray(raw, dtype=np.uint8).reshape(rows, cols // BLOCK, 34)
    return tile_rows(blocks[:, :, 2:34].view(np.int8), rows), tile_rows(_fp16_bits(blocks, 0), rows)


def repack_q5_0(raw: np.ndarray, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """GGUF Q5_0 bytes uint8 [rows, cols/32·22] → int8 layout (codes q − 16 [n_tiles, nb, 32, TILE],
    scales [n_tiles, nb, TILE] as the file's float16 bits, uint16). Weight i's low 4 bits: byte i (i < 16, low nibble) or
    byte i − 16 (high nibble); its 5th bit: bit i of the little-endian uint32 qh."""
    blocks = np.asarray(raw, dtype=np.uint8).reshape(rows, cols // BLOCK, 22)
    qs = blocks[:, :, 6:22]
    low = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # (rows, nb, 32)
    qh = np.ascontiguousarray(blocks[:, :, 2:6]).view(np.uint32)  # (rows, nb, 1)
    high = ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)  # (rows, nb, 32)
    codes = ((low | (high << 4)).astype(np.int16) - 16).astype(np.int8)
    return tile_rows(codes, rows), tile_rows(_fp16_bits(blocks, 0), rows)


QK_K = 256  # weights per K-quant super-block


def repack_q4_k(raw: np.ndarray, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GGUF Q4_K bytes uint8 [rows, cols/256·144] → the 4-bit affine layout of :func:`repack_q4_1`
    (blocks of 32). Each 64-weight chunk of a super-block stores sub-block 2j in the low nibbles of
    its 32 bytes and sub-block 2j + 1 in the high nibbles; the 6-bit scales are unpacked with the
    ``gguf`` package's ``Q4_K.get_scale_min``."""
    from gguf.quants import Q4_K

    n_super = cols // QK_K
    blocks = np.asarray(raw, dtype=np.uint8).reshape(rows * n_super, 144)
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)  # (rows·ns, 1)
    dmin = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    sc, m = Q4_K.get_scale_min(blocks[:, 4:16])  # (rows·ns, 8) each
    scales = (d * sc.astype(np.float32)).reshape(rows, n_super * 8)
    mins = -(dmin * m.astype(np.float32)).reshape(rows, n_super * 8)
    qs = blocks[:, 16:144].reshape(rows * n_super, 4, 32)
    q = np.stack([qs & 0x0F, qs >> 4], axis=2).reshape(rows, n_super * 8, 32)  # weight order
    codes = q[:, :, :16] | (q[:, :, 16:] << 4)  # Q4_1 order: byte i = weight i | weight i + 16
    return tile_rows(codes, rows), tile_rows(scales, rows), tile_rows(mins, rows)


def repack_q6_k(raw: np.ndarray, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """GGUF Q6_K bytes uint8 [rows, cols/256·210] → int8 layout with blocks of 16 (codes q − 32
    [n_tiles, cols/16, 16, TILE], scales d·sc float32 [n_tiles, cols/16, TILE]). Per 128-weight
    half: ql 64 bytes (low nibbles of weights 0–63, high nibbles of 64–127), qh 32 bytes (2 bits
    each of weights l, l+32, l+64, l+96)."""
    n_super = cols // QK_K
    blocks = np.asarray(raw, dtype=np.uint8).reshape(rows * n_super, 210)
    ql = blocks[:, 0:128].reshape(-1, 2, 2, 32)  # (half, [bytes 0-31 | 32-63], l)
    qh = blocks[:, 128:192].reshape(-1, 2, 1, 32)  # (half, l)
    sc = blocks[:, 192:208].view(np.int8).astype(np.float32)  # (rows·ns, 16)
    d = blocks[:, 208:210].copy().view(np.float16).astype(np.float32)  # (rows·ns, 1)
    low = np.concatenate([ql & 0x0F, ql >> 4], axis=2)  # (n, half, 4 quarters, 32)
    high = (qh >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)) & 3
    q = (low | (high << 4)).astype(np.int16) - 32  # weight order within each half
    codes = q.astype(np.int8).reshape(rows, n_super * 16, 16)
    scales = (d * sc).reshape(rows, n_super * 16)
    return tile_rows(codes, rows), tile_rows(scales, rows)


@njit(cache=True, fastmath=FASTMATH)
def _block_sums(x):
    """Σ of each 32-element block of x (float32 [cols] → float32 [cols / 32])."""
    nb = x.shape[0] // BLOCK
    xsum = np.empty(nb, np.float32)
    for b in range(nb):
        s = np.float32(0.0)
        for i in range(BLOCK):
            s += x[b * BLOCK + i]
        xsum[b] = s
    return xsum


@njit(cache=True, fastmath=FASTMATH, inline="always")
def _four_bytes(codes, t, b, i, r, lo0, lo1, lo2, lo3, hi0, hi1, hi2, hi3):
    """Σ over code bytes i .. i+3 of output row r's block b: low nibble × x[lo], high × x[hi].

    Four bytes (eight weights) per pass: the row's block accumulator is loaded and stored once per
    eight products rather than per two, which took 0.64 → 0.37 µs per row and 1536×576 matrix at 16
    rows (1 thread) here. The matrix × vector and small-batch kernels both sum through this one
    function, in this order, so a row's result is the same bits in either.
    """
    q0, q1, q2, q3 = codes[t, b, i, r], codes[t, b, i + 1, r], codes[t, b, i + 2, r], codes[t, b, i + 3, r]
    return (((low_nibble_f32(q0) * lo0 + high_nibble_f32(q0) * hi0)
             + (low_nibble_f32(q1) * lo1 + high_nibble_f32(q1) * hi1))
            + ((low_nibble_f32(q2) * lo2 + high_nibble_f32(q2) * hi2)
               + (low_nibble_f32(q3) * lo3 + high_nibble_f32(q3) * hi3)))


@njit(cache=True, fastmath=FASTMATH)
def _q4_1_tile(codes, scales, mins, x, xsum, t, y):
    """Rows of tile t of y = W x (Q4_1): Σ_blocks (d · Σ_i q_i x_i + m · Σ_i x_i)."""
    nb, T = codes.shape[1], codes.shape[3]
    acc = np.zeros(T, np.float32)
    blk = np.empty(T, np.float32)
    for b in range(nb):
        for r in range(T):
            blk[r] = 0.0
        for i in range(0, 16, 4):
            c = b * BLOCK + i
            lo0, lo1, lo2, lo3 = x[c], x[c + 1], x[c + 2], x[c + 3]
            hi0, hi1, hi2, hi3 = x[c + 16], x[c + 17], x[c + 18], x[c + 19]
            for r in range(T):
                blk[r] += _four_bytes(codes, t, b, i, r, lo0, lo1, lo2, lo3, hi0, hi1, hi2, hi3)
        for r in range(T):
            acc[r] += as_float32(scales[t, b, r]) * blk[r] + as_float32(mins[t, b, r]) * xsum[b]
    for r in range(min(T, y.shape[0] - t * T)):
        y[t * T + r] = acc[r]


@njit(cache=True, fastmath=FASTMATH, parallel=True)
def q4_1_matvec(codes, scales, mins, x, y):
    """y = W x for a repacked Q4_1 W. x: float32 [cols]; y: float32 [rows], overwritten.

    The block sums of x are shared by all rows (the m·Σx term of each block).
    """
    xsum = _block_sums(x)
    for t in prange(codes.shape[0]):
        _q4_1_tile(codes, scales, mins, x, xsum, t, y)


@njit(cache=True, fastmath=FASTMATH, parallel=True)
def q4_1_matvec3(codes_a, scales_a, mins_a, y_a, codes_b, scales_b, mins_b, y_b,
                 codes_c, scales_c, mins_c, y_c, x):
    """Three Q4_1 products of the same x in one parallel region (e.g. W_q, W_k, W_v, or W_gate,
    W_up with an empty third): one start-up of the worker threads instead of three, and the
    tiles of all three matrices share the cores evenly. Pass 0-tile arrays for an unused slot."""
    xsum = _block_sums(x)
    na, nb = codes_a.shape[0], codes_b.shape[0]
    for task in prange(na + nb + codes_c.shape[0]):
        if task < na:
            _q4_1_tile(codes_a, scales_a, mins_a, x, xsum, task, y_a)
        elif task < na + nb:
            _q4_1_tile(codes_b, scales_b, mins_b, x, xsum, task - na, y_b)
        else:
            _q4_1_tile(codes_c, scales_c, mins_c, x, xsum, task - na - nb, y_c)


@njit(cache=True, fastmath=FASTMATH, parallel=True)
def q4_1_matmul(codes, scales, mins, x, y):
    """Y = X Wᵀ for a few rows of X and a repacked Q4_1 W: each weight is unpacked once and used
    for every row. x: float32 [n, cols]; y: float32 [n, rows], overwritten."""
    n = x.shape[0]
    rows, T = y.shape[1], codes.shape[3]
    nb = codes.shape[1]
    xsum = np.empty((n, nb), np.float32)
    for k in range(n):
        xsum[k] = _block_sums(x[k])
    for t in prange(codes.shape[0]):
        acc = np.zeros((n, T), np.float32)
        blk = np.empty((n, T), np.float32)
        for b in range(nb):
            blk[:, :] = 0.0
            for i in range(0, 16, 4):
                c = b * BLOCK + i
                for k in range(n):
                    lo0, lo1, lo2, lo3 = x[k, c], x[k, c + 1], x[k, c + 2], x[k, c + 3]
                    hi0, hi1, hi2, hi3 = x[k, c + 16], x[k, c + 17], x[k, c + 18], x[k, c + 19]
                    for r in range(T):
                        blk[k, r] += _four_bytes(codes, t, b, i, r, lo0, lo1, lo2, lo3, hi0, hi1, hi2, hi3)
            for k in range(n):
                for r in range(T):
                    acc[k, r] += as_float32(scales[t, b, r]) * blk[k, r] + as_float32(mins[t, b, r]) * xsum[k, b]
        for k in range(n):
            for r in range(min(T, rows - t * T)):
                y[k, t * T + r] = acc[k, r]


@njit(cache=True, fastmath=FASTMATH, inline="always")
def _int8_tile(codes, scales, x, t, y):
    """Rows of tile t of y = W x (int8 layout): Σ_blocks d · Σ_i q_i x_i, four codes a pass. The
    same operations, in the same order, as one row of :func:`int8_matmul`, so a sequence decoding
    alone gets the logits it gets in a batch, bit for bit. Inlined where it is called: as a called
    function it made Gemma 3's output-head product slower here (7.9–11.0 ms against 5.6–5.8)."""
    nb, bs, T = codes.shape[1], codes.shape[2], codes.shape[3]
    acc = np.zeros(T, np.float32)
    d = np.empty(T, np.float32)
    for b in range(nb):
        for r in range(T):
            d[r] = as_float32(scales[t, b, r])
        for i in range(0, bs, 4):
            c = b * bs + i
            x0, x1, x2, x3 = x[c], x[c + 1], x[c + 2], x[c + 3]
            for r in range(T):
                acc[r] += d[r] * (np.float32(codes[t, b, i, r]) * x0
                                  + np.float32(codes[t, b, i + 1, r]) * x1
                                  + np.float32(codes[t, b, i + 2, r]) * x2
                                  + np.float32(codes[t, b, i + 3, r]) * x3)
    for r in range(min(T, y.shape[0] - t * T)):
        y[t * T + r] = acc[r]


@njit(cache=True, fastmath=FASTMATH, parallel=True)
def int8_matvec(codes, scales, x, y):
    """y = W x for W in the int8 layout (Q8_0, Q5_0, Q6_K). x: float32 [cols]; y: float32 [rows],
    overwritten."""
    for t in prange(codes.shape[0]):
        _int8_tile(codes, scales, x, t, y)


@njit(cache=True, fastmath=FASTMATH, parallel=True)
def int8_matvec3(codes_a, scales_a, y_a, codes_b, scales_b, y_b, codes_c, scales_c, y_c, x):
    """Three int8-layout products of the same x in one parallel region, as :func:`q4_1_matvec3`
    does for the 4-bit layout (Gemma 3's Q5_0 W_q, W_k, W_v, or W_gate, W_up with an empty third):
    the tiles of all three share the cores, where W_k's and W_v's 8 tiles alone kept two threads
    barely busy. Pass 0-tile arrays for an unused slot."""
    na, nb = codes_a.shape[0], codes_b.shape[0]
    for task in prange(na + nb + codes_c.shape[0]):
        if task < na:
            _int8_tile(codes_a, scales_a, x, task, y_a)
        elif task < na + nb:
            _int8_tile(codes_b, scales_b, x, task - na, y_b)
        else:
            _int8_tile(codes_c, scales_c, x, task - na - nb, y_c)


@njit(cache=True, fastmath=FASTMATH, parallel=True)
def int8_matmul(codes, scales, x, y):
    """Y = X Wᵀ for a few rows of X and W in the int8 layout (Q8_0, Q5_0, Q6_K): each tile of
    weights is read once for all rows. x: float32 [n, cols]; y: float32 [n, rows], overwritten.

    Codes are taken four at a time (blocks hold 16 or 32): a row's accumulators are then loaded
    and stored once per four codes, not once per code, and the loop over the tile's rows is long
    enough for LLVM's widest vectors; that halves the time of a code-at-a-time loop here. Each row
    of X goes through the same operations in the same order whatever the other rows are, so a row's
    result does not depend on the batch it came in.
    """
    n = x.shape[0]
    n_tiles, nb, bs, T = codes.shape
    rows = y.shape[1]
    for t in prange(n_tiles):
        acc = np.zeros((n, T), np.float32)
        d = np.empty(T, np.float32)
        for b in range(nb):
            for r in range(T):
                d[r] = as_float32(scales[t, b, r])  # converted once per block, used n · bs/4 times
            for i in range(0, bs, 4):
                c = b * bs + i
                for k in range(n):
                    x0, x1, x2, x3 = x[k, c], x[k, c + 1], x[k, c + 2], x[k, c + 3]
                    for r in range(T):
                        acc[k, r] += d[r] * (np.float32(codes[t, b, i, r]) * x0
                                             + np.float32(codes[t, b, i + 1, r]) * x1
                                             + np.float32(codes[t, b, i + 2, r]) * x2
                                             + np.float32(codes[t, b, i + 3, r]) * x3)
        for k in range(n):
            for r in range(min(T, rows - t * T)):
                y[k, t * T + r] = acc[k, r]


@njit(cache=True, fastmath=FASTMATH, parallel=True)
def q4_1_dequantize_transposed(codes, scales, mins, out):
    """Wᵀ of a repacked Q4_1 matrix into out: float32 [cols, n_tiles·TILE] (padding rows included).

    Transposed because the tile layout then streams: each step writes TILE consecutive floats.
    The block's TILE scales and minimums are converted once, into two small arrays, before its 32
    code rows: with the conversion inside the innermost loop the loop did not vectorise and this
    kernel took as long as the BLAS product it feeds (4.3 vs 5.3 ms for a 1536×576 matrix and 512
    rows); hoisted, 5–20× less (0.1 ms), the same bits.
    """
    nb, T = codes.shape[1], codes.shape[3]
    for t in prange(codes.shape[0]):
        d, m = np.empty(T, np.float32), np.empty(T, np.float32)
        for b in range(nb):
            for r in range(T):
                d[r], m[r] = as_float32(scales[t, b, r]), as_float32(mins[t, b, r])
            for i in range(16):
                low = out[b * BLOCK + i, t * T : t * T + T]
                high = out[b * BLOCK + 16 + i, t * T : t * T + T]
                for r in range(T):
                    q = codes[t, b, i, r]
                    low[r] = d[r] * low_nibble_f32(q) + m[r]
                    high[r] = d[r] * high_nibble_f32(q) + m[r]


@njit(cache=True, fastmath=FASTMATH, parallel=True)
def int8_dequantize_transposed(codes, scales, out):
    """Wᵀ of an int8-layout matrix into out: float32 [cols, n_tiles·TILE] (padding rows included);
    each block's scales converted once, as in :func:`q4_1_dequantize_transposed`."""
    n_tiles, nb, bs, T = codes.shape
    for t in prange(n_tiles):
        d = np.empty(T, np.float32)
        for b in range(nb):
            for r in range(T):
                d[r] = as_float32(scales[t, b, r])
            for i in range(bs):
                row = out[b * bs + i, t * T : t * T + T]
                for r in range(T):
                    row[r] = d[r] * np.float32(codes[t, b, i, r])


@njit(cache=True, fastmath=FASTMATH, parallel=True)
def q4_1_dequantize_rows(codes, scales, mins, row_ids, out):
    """Float32 rows ``row_ids`` (int [n]) of a repacked Q4_1 matrix into out [n, cols]."""
    nb = codes.shape[1]
    for k in prange(row_ids.shape[0]):
        row = row_ids[k]
        t, r = row // TILE, row % TILE
        for b in range(nb):
            d, m = as_float32(scales[t, b, r]), as_float32(mins[t, b, r])
            for i in range(16):
                q = codes[t, b, i, r]
                out[k, b * BLOCK + i] = d * low_nibble_f32(q) + m
                out[k, b * BLOCK + 16 + i] = d * high_nibble_f32(q) + m


@njit(cache=True, fastmath=FASTMATH, parallel=True)
def int8_dequantize_rows(codes, scales, row_ids, out):
    """Float32 rows ``row_ids`` (int [n]) of an int8-layout matrix into out [n, cols]."""
    nb, bs = codes.shape[1], codes.shape[2]
    for k in prange(row_ids.shape[0]):
        row = row_ids[k]
        t, r = row // TILE, row % TILE
        for b in range(nb):
            d = as_float32(scales[t, b, r])
            for i in range(bs):
                out[k, b * bs + i] = d * np.float32(codes[t, b, i, r])


def warm_up() -> None:
    """Call each product and dequantisation kernel once on tiny repacked matrices, with float16-bit
    scales (Q4_1, Q8_0, Q5_0) and float32 ones (the K-quants), so Numba compiles (or loads from its
    disk cache) each specialisation before the first token."""
    f32 = np.float32
    x, xs, rows = np.ones(256, f32), np.ones((2, 256), f32), np.arange(2)
    for codes, scales, mins in (repack_q4_1(np.zeros((TILE, 8 * 20), np.uint8), TILE, 256),
                                repack_q4_k(np.zeros((TILE, 144), np.uint8), TILE, 256)):
        q4_1_matvec(codes, scales, mins, x, np.empty(TILE, f32))
        q4_1_matmul(codes, scales, mins, xs, np.empty((2, TILE), f32))
        y = np.empty(TILE, f32)
        # The unused third slot of a fused product: empty slices of the first matrix's arrays.
        q4_1_matvec3(codes, scales, mins, y, codes, scales, mins, y, codes[:0], scales[:0], mins[:0], y[:0], x)
        q4_1_dequantize_rows(codes, scales, mins, rows, np.empty((2, 256), f32))
        q4_1_dequantize_transposed(codes, scales, mins, np.empty((256, TILE), f32))
    for codes, scales in (repack_q8_0(np.zeros((TILE, 8 * 34), np.uint8), TILE, 256),
                          repack_q6_k(np.zeros((TILE, 210), np.uint8), TILE, 256)):
        int8_matvec(codes, scales, x, np.empty(TILE, f32))
        y = np.empty(TILE, f32)
        int8_matvec3(codes, scales, y, codes, scales, y, codes[:0], scales[:0], y[:0], x)
        int8_matmul(codes, scales, xs, np.empty((2, TILE), f32))
        int8_dequantize_rows(codes, scales, rows, np.empty((2, 256), f32))
        int8_dequantize_transposed(codes, scales, np.empty((256, TILE), f32))
