"""Pure tensor functions behind the curvature: block covariances, eigenbases, rotations, per-example grads.

Conventions: a layer's gradient is a matrix [d_out, w] (w = d_in + bias). An eigenbasis is stored as a list of
orthogonal blocks (one block = a full, unblocked basis), applied block-diagonally along the last dimension.
"""

from __future__ import annotations

import torch

#: per-example gradients are formed in chunks of at most this many elements (≈ 128 MB in float32)
CHUNK_ELEMENTS = 1 << 25


def split_sizes(d: int, blocks: int) -> list[int]:
    """Sizes of ``blocks`` equal contiguous blocks covering d (the first ones one larger if d % blocks)."""
    if blocks < 1:
        raise ValueError(f"blocks must be ≥ 1, got {blocks}")
    if blocks > d:
        raise ValueError(f"cannot split a dimension of {d} into {blocks} blocks")
    base, extra = divmod(d, blocks)
    return [base + (i < extra) for i in range(blocks)]


def block_covariance(
    x: torch.Tensor, sizes: list[int], dtype: torch.dtype, acc: list[torch.Tensor] | None = None
) -> list[torch.Tensor]:
    """Σ over rows of x_b x_bᵀ for each diagonal block b of x [M, d], added in place to ``acc`` if given;
    returns the blocks [d_b, d_b] in ``dtype``."""
    x = x.to(dtype)
    out, start = [], 0
    for i, size in enumerate(sizes):
        xb = x[:, start : start + size]
        if acc is None:
            out.append(xb.T @ xb)
        else:
            out.append(acc[i].addmm_(xb.T, xb))
        start += size
    return out


def eigh_blocks(blocks: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Eigendecompose each symmetric block in float64: (eigenvalues [d_b], eigenvectors [d_b, d_b]) lists."""
    vals, vecs = [], []
    for c in blocks:
        c64 = c.to(torch.float64)
        lam, q = torch.linalg.eigh(0.5 * (c64 + c64.T))
        vals.append(lam)
        vecs.append(q.contiguous())  # eigh returns column-major; a row-major basis saves and reloads bit for bit
    return vals, vecs


def rotate(x: torch.Tensor, q: list[torch.Tensor], transpose: bool = False) -> torch.Tensor:
    """x [..., d] @ blockdiag(q) (or @ blockdiag(q)ᵀ when ``transpose``)."""
    if len(q) == 1:
        return x @ (q[0].T if transpose else q[0])
    parts, start = [], 0
    for qb in q:
        size = qb.shape[0]
        parts.append(x[..., start : start + size] @ (qb.T if transpose else qb))
        start += size
    return torch.cat(parts, -1)


def to_eigenbasis(v: torch.Tensor, qs: list[torch.Tensor], qa: list[torch.Tensor]) -> torch.Tensor:
    """Q_Sᵀ V Q_A for V [..., d_out, w]."""
    return rotate(rotate(v, qa).mT, qs).mT


def from_eigenbasis(v: torch.Tensor, qs: list[torch.Tensor], qa: list[torch.Tensor]) -> torch.Tensor:
    """Q_S V Q_Aᵀ for V [..., d_out, w]."""
    return rotate(rotate(v, qa, transpose=True).mT, qs, transpose=True).mT


def per_example_grads(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Σ_t g_t ā_tᵀ for a [B, T, w], g [B, T, d_out] → [B, d_out, w]."""
    return torch.bmm(g.mT, a)


def rotate_tokens_first(t: int, d_out: int, w: int) -> bool:
    """Cost model: rotate T tokens then contract (T·(d_out² + w²)) vs contract then rotate (d_out·w·(d_out + w))."""
    return t * (d_out * d_out + w * w) <= d_out * w * (d_out + w)


def accumulate_squared_grads(
    acc_t: torch.Tensor,
    a: torch.Tensor,
    g: torch.Tensor,
    qs: list[torch.Tensor] | None = None,
    qa: list[torch.Tensor] | None = None,
    rotated_a: torch.Tensor | None = None,
    batched: bool | None = None,
) -> None:
    """acc_t [w, d_out] += Σ_n (Q_Sᵀ Ĝ_n Q_A)ᵀ⊙² for a [B, T, w], g [B, T, d_out] (no basis: Σ_n Ĝ_nᵀ⊙²).

    Works in the transposed [w, d_out] layout with one matmul and one fused multiply-add per example: the
    [w, d_out] product stays in cache, about 3× faster than a batched matmul followed by square-and-sum.
    Rotation order follows :func:`rotate_tokens_first`; ``rotated_a`` may pass a precomputed ā Q_A.
    batched: batched matmuls over chunks of examples instead (default: on CUDA, where launches dominate).
    a, g and the bases may be in a lower precision than ``acc_t`` (bfloat16): products are squared and summed in
    ``acc_t``'s dtype.
    """
    rotated = qs is not None and qa is not None
    tokens_first = rotated and rotate_tokens_first(a.shape[1], g.shape[2], a.shape[2])
    if tokens_first:
        a = rotated_a if rotated_a is not None else rotate(a, qa)  # type: ignore[arg-type]
        g = rotate(g, qs)  # type: ignore[arg-type]
    if a.is_cuda if batched is None else batched:
        step = chunk_rows(a.shape[0], g.shape[2], a.shape[2])
        for lo in range(0, a.shape[0], step):
            x = torch.bmm(a[lo : lo + step].mT, g[lo : lo + step])  # [b, w, d_out]
            if rotated and not tokens_first:
                x = to_eigenbasis(x.mT, qs, qa).mT  # type: ignore[arg-type]
            acc_t.add_(x.to(acc_t.dtype).square_().sum(0))
        return
    for b in range(a.shape[0]):
        x = a[b].T @ g[b]
        if rotated and not tokens_first:
            x = to_eigenbasis(x.T, qs, qa).T  # type: ignore[arg-type]
        x = x.to(acc_t.dtype)  # a no-op unless the products ran in a lower precision (bfloat16)
        acc_t.addcmul_(x, x)


def chunk_rows(batch: int, d_out: int, w: int) -> int:
    """How many examples' [d_out, w] gradients fit in one chunk of CHUNK_ELEMENTS."""
    return max(1, min(batch, CHUNK_ELEMENTS // max(1, d_out * w)))
