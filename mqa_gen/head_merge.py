"""Merge an attention layer's KV heads into fewer (down to one: MQA), four ways.

KV heads are merged in groups of consecutive heads, r = native / target per group (every head
for MQA), so that every query head keeps reading the merged head of its own group
(:mod:`mqa_gen.regroup`). Each method returns new :class:`~mqa_gen.head_transforms.AttentionWeights`
with target KV heads; W_q and W_o change too where the method folds a per-head map into them.

``mean``
    Mean-pool each group's K and V heads (Ainslie et al. 2023, "GQA", §2.1). No data.
``aligned``
    Jin et al., "Align Attention Heads Before Merging Them" (Findings of EMNLP 2025): first the
    exact transforms of :mod:`mqa_gen.head_transforms` — per key head one rotation per RoPE pair,
    per value head one orthogonal matrix — chosen by generalised Procrustes analysis on the
    calibration activations so that the heads of a group become as similar as possible, then the
    group is averaged. ``merge="ls"`` (the default) then refits what the readers see by least
    squares: each key head's pair i becomes c_j·(merged pair) with the complex c_j that fits best
    (folded into the query heads), each value head S_j·(merged head) with the best M_j (folded into
    W_o); ``merge="mean"`` keeps the plain average.
``svd``
    The best rank-head_dim approximation of the group's stacked projections, from the weights
    alone: values by the SVD of the stacked W_v (the map back to each head folded into W_o); keys
    the same under RoPE's constraint, one complex rank-1 approximation per frequency pair (a
    general head_dim-dimensional map would not commute with RoPE), folded into W_q.
``pca``
    As ``svd``, but of what the projections produce on the calibration text and weighted by how
    much their readers use it: the squared error that is minimised is that of each key pair
    times the energy of the query pairs reading it (the expected squared error of the score when
    query and key come from different tokens), and that of each value head seen through the W_o
    slices that read it. Key pairs that turn by at most one radian over ``rope_span`` tokens (the
    model's context length: the lowest RoPE frequencies, where SmolLM2's queries and keys keep
    most of their energy) are merged jointly, one real rank-(2·pairs) approximation across them,
    as if RoPE left them alone: the error this adds is small against what the per-pair
    constraint costs (on SmolLM2, 3 → 1 KV heads, held-out perplexity 100 with the 6 slowest
    pairs joint, 124 with none, 148 with 10).

The statistics the data-driven methods need are the second moment of the layer's input,
C = E[x xᵀ] over the calibration tokens (x = the normed hidden state entering attention): every
expectation of a projection's output is a quadratic form in C, so the text is read once.
"""

from __future__ import annotations

import numpy as np

from .errors import ConfigError
from .head_transforms import AttentionWeights, from_pairs, rope_pairs, transform_key_pairs, transform_values

METHODS = ("mean", "aligned", "svd", "pca")

#: Tokens over which ``pca`` treats the slowest RoPE pairs as unrotated (turning ≤ 1 radian):
#: SmolLM2's context length; :mod:`mqa_gen.calibrate` passes the model's own.
DEFAULT_ROPE_SPAN = 8192

#: Generalised Procrustes sweeps (each aligns every head to the sum of the others; a few suffice
#: for 2–8 heads per group).
PROCRUSTES_SWEEPS = 20


def input_moment(x: np.ndarray) -> np.ndarray:
    """C = E[x xᵀ] over the rows of x (any leading shape, last axis d_model): float64 [d, d]."""
    rows = np.asarray(x).reshape(-1, np.shape(x)[-1]).astype(np.float64)
    return rows.T @ rows / max(rows.shape[0], 1)


def procrustes(cross: np.ndarray) -> np.ndarray:
    """The orthogonal Q maximising tr(crossᵀ Q), i.e. minimising ‖A Q − B‖_F for cross = Aᵀ B
    (Schönemann 1966): Q = U Vᵀ from the SVD cross = U Σ Vᵀ. float64 [n, n]."""
    u, _, vt = np.linalg.svd(np.asarray(cross, dtype=np.float64))
    return u @ vt


def pair_rotation(cross: complex | np.ndarray) -> np.ndarray:
    """The unit complex number φ maximising Re(φ · cross): conj(cross) / |cross| (1 where cross is
    0). For cross = E[z · conj(z_ref)] it is the rotation of one RoPE pair that brings z closest
    to z_ref, minimising E|φ z − z_ref|² (2-D Procrustes restricted to rotations, the orthogonal
    maps that commute with RoPE). Elementwise."""
    cross = np.asarray(cross, dtype=np.complex128)
    size = np.abs(cross)
    return np.where(size > 0, np.conj(cross) / np.where(size > 0, size, 1.0), 1.0 + 0j)


def groups(native: int, target: int) -> list[np.ndarray]:
    """KV heads merged into each target head: consecutive runs of native / target heads."""
    r = native // target
    return [np.arange(g * r, (g + 1) * r) for g in range(target)]


def key_alignment(w: AttentionWeights, moment: np.ndarray, target: int) -> np.ndarray:
    """Jin et al.'s key rotations: complex unit factors [n_kv_heads, head_dim/2] (for
    :func:`~mqa_gen.head_transforms.transform_key_pairs`) that maximise, per group and RoPE pair,
    E|Σ_j φ_j z_j|² — the heads' pair-i outputs z_j as alike as rotations can make them — by
    generalised Procrustes analysis (each head rotated in turn onto the sum of the others)."""
    keys = w.key_pairs()  # (KV, D/2, d)
    factors = np.ones(keys.shape[:2], dtype=np.complex128)
    for members in groups(w.n_kv_heads, target):
        k = keys[members]  # (r, D/2, d)
        s = np.einsum("jpd,de,kpe->pjk", k, moment, k.conj())  # E[z_j conj z_k] per pair: (D/2, r, r)
        phi = pair_rotation(s[:, :, 0])  # start: every head rotated onto the group's first
        for _ in range(PROCRUSTES_SWEEPS):
            for j in range(len(members)):
                others = np.einsum("pk,pk->p", s[:, j, :], np.conj(phi)) - s[:, j, j] * np.conj(phi[:, j])
                phi[:, j] = pair_rotation(others)  # E[(Σ_k≠j φ_k z_k) conj z_j]'s conjugate phase
        factors[members] = phi.T
    return factors


def value_alignment(w: AttentionWeights, moment: np.ndarray, target: int) -> np.ndarray:
    """Jin et al.'s value maps: orthogonal [n_kv_heads, head_dim, head_dim] (for
    :func:`~mqa_gen.head_transforms.transform_values`) maximising, per group, E‖Σ_j S_j v_j‖² by
    generalised Procrustes analysis."""
    heads = w.value_heads()  # (KV, D, d)
    D = w.head_dim
    maps = np.tile(np.eye(D), (w.n_kv_heads, 1, 1))
    for members in groups(w.n_kv_heads, target):
        cross = {(j, k): heads[j] @ moment @ heads[k].T for j in members for k in members}  # E[v_j v_kᵀ]
        for j in members[1:]:  # start: every head rotated onto the group's first
            maps[j] = procrustes(cross[(members[0], j)])
        for _ in range(PROCRUSTES_SWEEPS):
            for j in members:
                # E[(Σ_k≠j S_k v_k) v_jᵀ]: S_j = its Procrustes rotation onto the others' sum
                m = sum(maps[k] @ cross[(k, j)] for k in members if k != j)
                if len(members) > 1:
                    maps[j] = procrustes(m)
    return maps


def _sqrt_psd(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(A^½, A^-½) of a symmetric positive semi-definite matrix, eigenvalues floored at 1e-10·max."""
    vals, vecs = np.linalg.eigh((a + a.T) / 2)
    vals = np.maximum(vals, max(vals.max(), 1e-300) * 1e-10)
    return (vecs * np.sqrt(vals)) @ vecs.T, (vecs / np.sqrt(vals)) @ vecs.T


def _top_eigvecs(a: np.ndarray, k: int) -> np.ndarray:
    """The k eigenvectors of the Hermitian a with the largest eigenvalues, as columns, largest first."""
    _, vecs = np.linalg.eigh((a + a.conj().T) / 2)
    return vecs[:, ::-1][:, :k]


def _mean_merge(w: AttentionWeights, target: int) -> AttentionWeights:
    """Each group's K and V heads averaged (in float64; Ainslie et al. 2023, §2.1)."""
    D, r = w.head_dim, w.n_kv_heads // target

    def pool(rows):
        return rows.reshape(target, r, D, -1).mean(axis=1).reshape(target * D, -1)

    return w.replace(wk=pool(w.wk), wv=pool(w.wv))


def _aligned_merge(w: AttentionWeights, moment: np.ndarray, target: int, merge: str) -> AttentionWeights:
    """Procrustes transforms (exact), mean merge, then optionally the least-squares readers' refit."""
    aligned = transform_key_pairs(w, key_alignment(w, moment, target))
    aligned = transform_values(aligned, value_alignment(aligned, moment, target))
    merged = _mean_merge(aligned, target)
    if merge == "mean":
        return merged
    G, D, half = w.group_size, w.head_dim, w.head_dim // 2
    keys, mkeys = aligned.key_pairs(), merged.key_pairs()  # (KV, D/2, d), (target, D/2, d)
    queries = aligned.query_pairs()  # (H, D/2, d)
    wo = aligned.wo.copy()
    vals, mvals = aligned.value_heads(), merged.value_heads()
    for g, members in enumerate(groups(w.n_kv_heads, target)):
        zz = np.real(np.einsum("pd,de,pe->p", mkeys[g], moment, mkeys[g].conj()))  # E|z̄|²  (D/2,)
        vv = mvals[g] @ moment @ mvals[g].T  # E[v̄ v̄ᵀ]
        for j in members:
            c = np.einsum("pd,de,pe->p", keys[j], moment, mkeys[g].conj()) / np.maximum(zz, 1e-300)  # z_j ≈ c z̄
            queries[j * G:(j + 1) * G] *= np.conj(c)[None, :, None]
            m = np.linalg.solve(vv, (vals[j] @ moment @ mvals[g].T).T).T  # v_j ≈ M_j v̄ (least squares)
            for h in range(j * G, (j + 1) * G):
                wo[:, h * D:(h + 1) * D] = wo[:, h * D:(h + 1) * D] @ m
    return merged.replace(wq=from_pairs(queries, w.rope_interleaved), wo=wo)


def _lowrank_merge(w: AttentionWeights, moment: np.ndarray | None, target: int, rope_theta: float | None,
                   rope_span: int) -> AttentionWeights:
    """``svd`` (moment None: weights only, unweighted) or ``pca`` (see the module doc)."""
    weighted = moment is not None
    d, D, G, half = w.d_model, w.head_dim, w.group_size, w.head_dim // 2
    C = moment if weighted else np.eye(d)
    keys, queries = w.key_pairs(), w.query_pairs()  # (KV, D/2, d), (H, D/2, d)
    new_keys = np.zeros((target, half, d), dtype=np.complex128)
    joint = np.zeros(half, dtype=bool)
    if weighted and rope_theta is not None and rope_span > 0:
        omega = rope_theta ** (-np.arange(half) * 2.0 / D)
        joint = omega * rope_span <= 1.0
    if rope_theta is None:  # no RoPE: every pair may mix with every other
        joint[:] = True
    wo, wq_rows = w.wo.copy(), None
    new_v = np.empty((target, D, d))
    vheads, oslices = w.value_heads(), w.output_slices()
    for g, members in enumerate(groups(w.n_kv_heads, target)):
        r = len(members)
        # keys, pair by pair: weighted complex rank 1 (z_j ≈ c_j z̄; the readers' pair × conj(c_j))
        for p in np.nonzero(~joint)[0]:
            k = keys[members, p]  # (r, d)
            s = k @ C @ k.conj().T  # E[z_j conj z_k]
            if weighted:  # energy of the query pairs that read head j's pair p
                e_q = np.array([np.real(np.einsum("hd,de,he->", queries[j * G:(j + 1) * G, p], C,
                                                  queries[j * G:(j + 1) * G, p].conj())) for j in members])
            else:
                e_q = np.ones(r)
            sw = np.sqrt(np.maximum(e_q, max(e_q.max(), 1e-300) * 1e-12))
            e = _top_eigvecs(sw[:, None] * s * sw[None, :], 1)[:, 0]
            new_keys[g, p] = (np.conj(e) * sw) @ k  # z̄ = Σ_j conj(e_j)·√w_j·z_j
            for i, j in enumerate(members):
                queries[j * G:(j + 1) * G, p] *= np.conj(e[i]) / sw[i]  # conj(c_j), c_j = e_j / √w_j
        # values: rank-D approximation of the stacked heads (weighted by the W_o slices reading them)
        roots, inv_roots = [], []
        for j in members:
            if weighted:
                sq, isq = _sqrt_psd(sum(oslices[h].T @ oslices[h] for h in range(j * G, (j + 1) * G)))
            else:
                sq = isq = np.eye(D)
            roots.append(sq), inv_roots.append(isq)
        b = np.concatenate([roots[i] @ vheads[j] for i, j in enumerate(members)])  # (r·D, d)
        u = _top_eigvecs(b @ C @ b.T, D)  # (r·D, D)
        new_v[g] = u.T @ b
        for i, j in enumerate(members):
            m = inv_roots[i] @ u[i * D:(i + 1) * D]  # v_j ≈ M_j v̄
            for h in range(j * G, (j + 1) * G):
                wo[:, h * D:(h + 1) * D] = oslices[h] @ m
    wk = from_pairs(new_keys, w.rope_interleaved)
    wq = from_pairs(queries, w.rope_interleaved)
    if joint.any():  # the slow pairs: one real rank-(2·n) approximation across them, weighted
        a, b_idx = rope_pairs(D, w.rope_interleaved)
        rows = np.concatenate([a[joint], b_idx[joint]])
        n = len(rows)
        for g, members in enumerate(groups(w.n_kv_heads, target)):
            roots, inv_roots = [], []
            for j in members:
                if weighted:  # E[q qᵀ] of the readers on these rows, summed
                    sq, isq = _sqrt_psd(sum(w.wq[h * D + rows] @ C @ w.wq[h * D + rows].T
                                            for h in range(j * G, (j + 1) * G)))
                else:
                    sq = isq = np.eye(n)
                roots.append(sq), inv_roots.append(isq)
            b = np.concatenate([roots[i] @ w.wk[j * D + rows] for i, j in enumerate(members)])  # (r·n, d)
            u = _top_eigvecs(b @ C @ b.T, n)
            wk[g * D + rows] = u.T @ b
            for i, j in enumerate(members):
                m = inv_roots[i] @ u[i * n:(i + 1) * n]  # k_j ≈ M_j k̄ on these rows
                for h in range(j * G, (j + 1) * G):
                    wq[h * D + rows] = m.T @ w.wq[h * D + rows]
    return w.replace(wq=wq, wk=wk, wv=new_v.reshape(target * D, d), wo=wo)


def merge_heads(w: AttentionWeights, target: int, method: str = "pca", moment: np.ndarray | None = None, *,
                merge: str = "ls", rope_theta: float | None = 10000.0,
                rope_span: int = DEFAULT_ROPE_SPAN) -> AttentionWeights:
    """Merge the KV heads of one layer to ``target`` (see the module doc for the methods).

    Args:
        w: the layer's weights (float64; GGUF layout).
        target: KV heads wanted: a divisor of w.n_kv_heads (a multiple replicates heads, exactly,
            whatever the method).
        method: ``"mean"``, ``"aligned"``, ``"svd"`` or ``"pca"``.
        moment: C = E[x xᵀ], float64 [d_model, d_model], of the layer's attention input on the
            calibration text (:func:`input_moment`); needed by ``aligned`` and ``pca``.
        merge: for ``aligned``: ``"ls"`` (least-squares refit of the readers) or ``"mean"``.
        rope_theta: the layer's RoPE base (None: no RoPE; every key coordinate may then mix).
        rope_span: for ``pca``: pairs turning by ≤ 1 radian over this many tokens merge jointly
            (0: none).

    Returns:
        New :class:`AttentionWeights` with ``target`` KV heads.

    Raises:
        ConfigError: an unknown method or merge, a target that neither divides nor is a multiple
            of the KV heads, a missing or misshapen moment.
    """
    native, D = w.n_kv_heads, w.head_dim
    if method not in METHODS:
        raise ConfigError(f"unknown merge method {method!r}; choose from {', '.join(METHODS)}")
    if merge not in ("ls", "mean"):
        raise ConfigError(f"merge must be 'ls' or 'mean', got {merge!r}")
    if target <= 0 or (native % target and target % native) or w.n_heads % target:
        raise ConfigError(f"cannot regroup {native} KV heads into {target} for {w.n_heads} query heads")
    if target >= native:  # replication is exact: nothing to choose
        def repeat(rows):
            return np.repeat(rows.reshape(native, D, -1), target // native, axis=0).reshape(target * D, -1)
        return w.replace(wk=repeat(w.wk), wv=repeat(w.wv))
    if method in ("aligned", "pca"):
        if moment is None:
            raise ConfigError(f"method {method!r} needs the calibration text's input moment")
        moment = np.asarray(moment, dtype=np.float64)
        if moment.shape != (w.d_model, w.d_model):
            raise ConfigError(f"the input moment must be [{w.d_model}, {w.d_model}], got {moment.shape}")
    if method == "mean":
        return _mean_merge(w, target)
    if method == "aligned":
        return _aligned_merge(w, moment, target, merge)
    return _lowrank_merge(w, moment if method == "pca" else None, target, rope_theta, rope_span)
