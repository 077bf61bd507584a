"""The per-layer contraction of a scan and its cost model: which order of products each layer uses."""

from __future__ import annotations

import torch

from influencer.layers import Layer
from influencer.queries import LayerQueries, QueryStore

#: extra memory the scan may spend on dense copies of rank-k queries to use the cheaper contraction order
DEFAULT_DENSE_BUDGET = 1 << 30
#: the contraction's precision (scan's ``precision``): "float32" is the model's compute dtype
PRECISIONS = {"float32": None, "bfloat16": torch.bfloat16}
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
        if lq.low_rank:
            assert lq.left is not None and lq.right is not None
            k = lq.left.shape[-1]
            self.k = k
            self.left = lq.left.to(device, dtype).permute(1, 0, 2).reshape(d_out, q * k)  # [d_out, Q·k]
            self.right = lq.right.to(device, dtype).permute(2, 0, 1).reshape(w, q * k)  # [w, Q·k]
            self.p_in = None
        else:
            self.k = None
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
        a, g = a.to(self.dtype), g.to(self.dtype)
        b, t, _ = a.shape
        if self.k is not None:
            prod = (g @ self.left) * (a @ self.right)  # [B, T, Q·k]
            per = prod.view(b, t, self.q, self.k).sum(-1)
        else:
            assert self.p_in is not None
            pa = (a @ self.p_in).view(b, t, self.q, -1)  # [B, T, Q, d_out]
            per = (pa * g.unsqueeze(2)).sum(-1)
        return per.permute(2, 0, 1).to(self.out_dtype)

    def scores(self, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """⟨P, Σ_t g_t ā_tᵀ⟩ per query and sequence: [Q, B]."""
        if self.mode == "tokens":
            return self.token_scores(a, g).sum(-1)
        assert self.p_flat is not None
        a, g = a.to(self.dtype), g.to(self.dtype)
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
