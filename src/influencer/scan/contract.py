"""The per-layer contraction of a scan and its cost model: which order of products each layer uses."""

from __future__ import annotations

import torch

from influencer.layers import Layer
from influencer.queries import LayerQueries, QueryStore

#: extra memory the scan may spend on dense copies of rank-k queries to use the cheaper contraction order
DEFAULT_DENSE_BUDGET = 1 << 30
#: working memory for a chunk of materialized per-sequence gradients
_MATERIALIZE_CHUNK_BYTES = 256 << 20


# --------------------------------------------------------------------------------------------------------
# Per-layer contraction with a cost model
# --------------------------------------------------------------------------------------------------------


def contraction_costs(q: int, k: int | None, t: float, d_out: int, w: int) -> dict[str, float]:
    """Multiply-adds per training sequence for one layer.

    "tokens": never form the per-sequence gradient; Σ_t (U_kᵀ g_t)·(S_k V_kᵀ ā_t) (or g_tᵀ P ā_t if exact).
    "materialize": form Ĝ = Σ_t g_t ā_tᵀ once (T·d_out·w), then one dot product per query (Q·d_out·w).
    """
    per_token = q * (k * (d_out + w) if k is not None else d_out * w)
    return {"tokens": t * per_token, "materialize": t * d_out * w + q * d_out * w}


def _cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x if x.dtype == dtype else x.to(dtype)


class _LayerScorer:
    """Scores of one layer for all queries: [Q, B] per batch, or per token [Q, B, T].

    ``dtype``: the contraction's precision (the queries are kept in it and ā, g cast to it; bfloat16 runs the
    products on bf16 units with float32 accumulation inside each product); ``out_dtype``: the scores' dtype
    (default ``dtype``)."""

    def __init__(
        self,
        layer: Layer,
        lq: LayerQueries,
        mode: str,
        dtype: torch.dtype,
        device: torch.device,
        out_dtype: torch.dtype | None = None,
    ):
        self.layer, self.mode, self.dtype, self.out_dtype = layer, mode, dtype, out_dtype or dtype
        d_out, w = layer.shape
        q = lq.n_queries
        self.k = lq.left.shape[-1] if lq.low_rank else None  # type: ignore[union-attr]
        self.left = self.right = self.p_in = None  # the per-token layouts (tokens mode only)
        if mode == "tokens" and lq.low_rank:
            assert lq.left is not None and lq.right is not None and self.k is not None
            self.left = lq.left.to(device, dtype).permute(1, 0, 2).reshape(d_out, q * self.k)  # [d_out, Q·k]
            self.right = lq.right.to(device, dtype).permute(2, 0, 1).reshape(w, q * self.k)  # [w, Q·k]
        elif mode == "tokens":
            p = lq.to_dense().to(device, dtype)
            self.p_in = p.permute(2, 0, 1).reshape(w, q * d_out)  # ā_t @ p_in → [Q, d_out] per token
        self.q = q
        # materialize mode: P in the [w, d_out] layout of per-example aᵀg products (formed in it: no transposing copy)
        self.p_flat = None
        if mode == "materialize":
            if lq.low_rank:
                assert lq.left is not None and lq.right is not None
                pt = torch.bmm(lq.right.to(device).mT, lq.left.to(device).mT)
            else:
                pt = lq.to_dense().to(device).mT
            self.p_flat = pt.to(dtype).reshape(q, w * d_out)

    def token_scores(self, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """⟨P, g_t ā_tᵀ⟩ per query and token: [Q, B, T]."""
        a, g = _cast(a, self.dtype), _cast(g, self.dtype)
        b, t, _ = a.shape
        if self.k is not None:
            assert self.left is not None and self.right is not None
            prod = (g @ self.left) * (a @ self.right)  # [B, T, Q·k]
            per = prod.view(b, t, self.q, self.k).sum(-1)
        else:
            assert self.p_in is not None
            pa = (a @ self.p_in).view(b, t, self.q, -1)  # [B, T, Q, d_out]
            per = (pa * g.unsqueeze(2)).sum(-1)
        return _cast(per.permute(2, 0, 1), self.out_dtype)

    def scores(self, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """⟨P, Σ_t g_t ā_tᵀ⟩ per query and sequence: [Q, B]."""
        if self.mode == "tokens":
            return self.token_scores(a, g).sum(-1)
        assert self.p_flat is not None
        a, g = _cast(a, self.dtype), _cast(g, self.dtype)
        b = a.shape[0]
        out = torch.empty(self.q, b, dtype=self.out_dtype, device=a.device)
        # per-sequence gradients Ĝ_b = ā_bᵀ g_b for a chunk of sequences at once, then one GEMM against all queries
        chunk = max(1, _MATERIALIZE_CHUNK_BYTES // (self.p_flat.shape[1] * a.element_size()))
        for i in range(0, b, chunk):
            grads = torch.bmm(a[i : i + chunk].mT, g[i : i + chunk])  # [b', w, d_out]
            out[:, i : i + chunk] = self.p_flat @ grads.reshape(grads.shape[0], -1).T
        return out


def _choose_modes(
    layers: list[Layer], store: QueryStore, tokens_per_seq: float, dense_budget: int, force: str | None
) -> dict[str, str]:
    """Pick each layer's contraction order by the cost model, within a memory budget for dense copies."""
    modes: dict[str, str] = {}
    gains = []
    for layer in layers:
        lq = store.layers[layer.name]
        d_out, w = layer.shape
        cost = contraction_costs(lq.n_queries, lq.rank, tokens_per_seq, d_out, w)
        modes[layer.name] = "tokens"
        if force is not None:
            modes[layer.name] = force
        elif cost["materialize"] < cost["tokens"]:
            extra = lq.n_queries * d_out * w * 4 if lq.low_rank else 0
            gains.append((cost["tokens"] - cost["materialize"], extra, layer.name))
    budget = dense_budget
    for _gain, extra, name in sorted(gains, reverse=True):
        if extra <= budget:
            modes[name] = "materialize"
            budget -= extra
    return modes


# --------------------------------------------------------------------------------------------------------
# Layers of one shape scored together
# --------------------------------------------------------------------------------------------------------


class _FusedScorers:
    """Layers with the same shape, mode, rank and precision scored by one batched product per batch instead of
    one product per layer (fewer, larger kernels: what a GPU needs). The members' query copies become views of
    one stacked tensor, so fusing costs no memory once built. Scores equal the per-layer ones up to rounding."""

    def __init__(self, members: list[_LayerScorer]):
        first = members[0]
        self.members, self.mode, self.k, self.q = members, first.mode, first.k, first.q
        self.dtype, self.out_dtype = first.dtype, first.out_dtype
        self.p_flat = self.left = self.right = self.p_in = None
        for attr in ("p_flat", "left", "right", "p_in"):
            part = getattr(first, attr)
            if part is None:
                continue
            stacked = torch.empty((len(members), *part.shape), dtype=part.dtype, device=part.device)
            for i, m in enumerate(members):  # one member's copy at a time: the peak is the stack + one layer
                stacked[i].copy_(getattr(m, attr))
                setattr(m, attr, stacked[i])
            setattr(self, attr, stacked)

    def scores(self, a: list[torch.Tensor], g: list[torch.Tensor]) -> torch.Tensor:
        """⟨P_l, Σ_t g_t ā_tᵀ⟩ of every member l: [L, Q, B] from its ā [B, T, w] and g [B, T, d_out]."""
        a_s = torch.stack([x.to(self.dtype) for x in a])  # [L, B, T, w]
        g_s = torch.stack([x.to(self.dtype) for x in g])  # [L, B, T, d_out]
        n, b, t, w = a_s.shape
        d_out = g_s.shape[-1]
        if self.mode == "tokens":
            if self.k is not None:
                assert self.left is not None and self.right is not None
                prod = torch.bmm(g_s.view(n, b * t, d_out), self.left) * torch.bmm(a_s.view(n, b * t, w), self.right)
                per = prod.view(n, b, t, self.q, self.k).sum((2, 4))  # [L, B, Q]
            else:
                assert self.p_in is not None
                pa = torch.bmm(a_s.view(n, b * t, w), self.p_in).view(n, b, t, self.q, d_out)
                per = (pa * g_s.unsqueeze(3)).sum((2, 4))
            return per.mT.to(self.out_dtype)
        assert self.p_flat is not None
        out = torch.empty(n, self.q, b, dtype=self.out_dtype, device=a_s.device)
        chunk = max(1, _MATERIALIZE_CHUNK_BYTES // (n * w * d_out * a_s.element_size()))
        for i in range(0, b, chunk):
            j = min(b, i + chunk)
            grads = torch.bmm(a_s[:, i:j].reshape(-1, t, w).mT, g_s[:, i:j].reshape(-1, t, d_out))  # [L·b', w, d]
            out[:, :, i:j] = torch.bmm(self.p_flat, grads.view(n, j - i, w * d_out).mT)
        return out


class _Scoring:
    """Every tracked layer's scorer, layers of one configuration fused (``fuse``) or each on its own; called on a
    batch's captured ā, g it returns the per-layer scores [L, Q, B] in the layers' order."""

    def __init__(self, scorers: list[_LayerScorer], *, fuse: bool):
        self.n = len(scorers)
        groups: dict[tuple, list[int]] = {}
        for i, s in enumerate(scorers):
            key = (s.mode, s.k, s.q, s.dtype, tuple(s.layer.shape)) if fuse else (i,)
            groups.setdefault(key, []).append(i)
        self.parts: list[tuple[list[int], _LayerScorer | _FusedScorers]] = [
            (idx, scorers[idx[0]] if len(idx) == 1 else _FusedScorers([scorers[i] for i in idx]))
            for idx in groups.values()
        ]

    @property
    def fused(self) -> int:
        """Layers scored inside a fused group."""
        return sum(len(idx) for idx, part in self.parts if isinstance(part, _FusedScorers))

    def __call__(self, io: dict, names: list[str]) -> torch.Tensor:
        if not any(isinstance(part, _FusedScorers) for _, part in self.parts):  # one product per layer
            return torch.stack([part.scores(io[names[i[0]]].a, io[names[i[0]]].g) for i, part in self.parts])
        out: torch.Tensor | None = None
        for idx, part in self.parts:
            if isinstance(part, _FusedScorers):
                s = part.scores([io[names[i]].a for i in idx], [io[names[i]].g for i in idx])
            else:
                s = part.scores(io[names[idx[0]]].a, io[names[idx[0]]].g).unsqueeze(0)
            if out is None:
                out = torch.empty(self.n, *s.shape[1:], dtype=s.dtype, device=s.device)
            out[idx] = s
        assert out is not None
        return out
