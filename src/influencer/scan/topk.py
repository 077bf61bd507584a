"""Running top-k state of a scan: top and bottom lists, layer bands, totals; merged across shards and ranks."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

BANDS = ("lower", "middle", "upper")


# --------------------------------------------------------------------------------------------------------
# Running top-k and totals
# --------------------------------------------------------------------------------------------------------


@dataclass
class _Top:
    """Top-k per query: values [Q, K], indices [Q, K] (−1 = empty), per-layer scores [Q, K, L]."""

    values: torch.Tensor
    indices: torch.Tensor
    layers: torch.Tensor

    @classmethod
    def empty(
        cls, q: int, k: int, n_layers: int, largest: bool, dtype: torch.dtype, device: torch.device | str = "cpu"
    ) -> _Top:
        fill = float("-inf") if largest else float("inf")
        return cls(
            torch.full((q, k), fill, dtype=dtype, device=device),
            torch.full((q, k), -1, dtype=torch.long, device=device),
            torch.zeros(q, k, n_layers, dtype=dtype, device=device),
        )

    def to(self, device: torch.device | str) -> _Top:
        return _Top(self.values.to(device), self.indices.to(device), self.layers.to(device))

    def update(self, values: torch.Tensor, indices: torch.Tensor, layers: torch.Tensor, largest: bool) -> None:
        """values [Q, B], indices [B] (or [Q, B]), layers [Q, B, L]; masked entries hold ∓inf."""
        k = self.values.shape[1]
        q = values.shape[0]
        idx = indices.expand(q, -1) if indices.dim() == 1 else indices
        all_v = torch.cat([self.values, values], 1)
        all_i = torch.cat([self.indices, idx], 1)
        all_l = torch.cat([self.layers, layers], 1)
        # deterministic: order by value, ties by smaller index (stable sort on a pre-sorted index order)
        order = torch.argsort(all_i, dim=1, stable=True)
        all_v, all_i = all_v.gather(1, order), all_i.gather(1, order)
        all_l = all_l.gather(1, order.unsqueeze(-1).expand_as(all_l))
        top = torch.argsort(all_v, dim=1, descending=largest, stable=True)[:, :k]
        self.values = all_v.gather(1, top)
        self.indices = all_i.gather(1, top)
        self.layers = all_l.gather(1, top.unsqueeze(-1).expand(-1, -1, all_l.shape[-1]))
        self.indices = torch.where(torch.isfinite(self.values), self.indices, -1)  # (no host sync on a GPU)


def _band_slices(n_layers: int) -> dict[str, slice]:
    """Lower / middle / upper third of the tracked layers (in forward order)."""
    cuts = [round(i * n_layers / 3) for i in range(4)]
    return {band: slice(cuts[i], cuts[i + 1]) for i, band in enumerate(BANDS)}


@dataclass
class _State:
    """Everything a range of training sequences contributes; shards merge by :meth:`merge`."""

    top: _Top
    bottom: _Top
    bands: dict[str, _Top]
    count: torch.Tensor
    total: torch.Tensor
    positive: torch.Tensor
    squares: torch.Tensor
    scores: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (indices [B], [Q, B])

    @classmethod
    def empty(cls, q: int, k: int, n_layers: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> _State:
        """An empty state on ``device`` (a scan keeps it on the model's device: no host sync per batch)."""
        z = torch.zeros(q, dtype=torch.float64, device=device)
        return cls(
            _Top.empty(q, k, n_layers, True, dtype, device),
            _Top.empty(q, k, n_layers, False, dtype, device),
            {b: _Top.empty(q, k, n_layers, True, dtype, device) for b in BANDS},
            z.clone(),
            z.clone(),
            z.clone(),
            z.clone(),
        )

    def update(
        self, indices: torch.Tensor, per_layer: torch.Tensor, allowed: torch.Tensor | None, keep_scores: bool
    ) -> None:
        """per_layer [L, Q, B] scores of sequences ``indices`` [B]; allowed [Q, B] bool (prefilter) or None."""
        total = per_layer.sum(0)
        layers = per_layer.permute(1, 2, 0)  # [Q, B, L]
        valid = torch.ones_like(total, dtype=torch.bool) if allowed is None else allowed
        inf = torch.tensor(float("inf"), dtype=total.dtype, device=total.device)
        self.top.update(torch.where(valid, total, -inf), indices, layers, True)
        self.bottom.update(torch.where(valid, total, inf), indices, layers, False)
        for band, sl in _band_slices(per_layer.shape[0]).items():
            band_total = per_layer[sl].sum(0)
            self.bands[band].update(torch.where(valid, band_total, -inf), indices, layers, True)
        t64 = torch.where(valid, total, 0).to(torch.float64)
        self.count += valid.sum(1)
        self.total += t64.sum(1)
        self.positive += t64.clamp_min(0).sum(1)
        self.squares += t64.pow(2).sum(1)
        if keep_scores:
            self.scores.append((indices.clone(), torch.where(valid, total, torch.nan)))

    def to(self, device: torch.device | str) -> _State:
        """The same state on ``device`` (kept scores too)."""
        return _State(
            self.top.to(device),
            self.bottom.to(device),
            {b: t.to(device) for b, t in self.bands.items()},
            self.count.to(device),
            self.total.to(device),
            self.positive.to(device),
            self.squares.to(device),
            [(i.to(device), s.to(device)) for i, s in self.scores],
        )

    def merge(self, other: _State) -> None:
        for mine, theirs, largest in (
            (self.top, other.top, True),
            (self.bottom, other.bottom, False),
            *((self.bands[b], other.bands[b], True) for b in BANDS),
        ):
            mine.update(theirs.values, theirs.indices, theirs.layers, largest)
        self.count += other.count
        self.total += other.total
        self.positive += other.positive
        self.squares += other.squares
        self.scores.extend(other.scores)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"count": self.count, "total": self.total, "positive": self.positive, "squares": self.squares}
        for name, top in (("top", self.top), ("bottom", self.bottom), *((f"band_{b}", self.bands[b]) for b in BANDS)):
            out.update({f"{name}/values": top.values, f"{name}/indices": top.indices, f"{name}/layers": top.layers})
        if self.scores:
            out["scores/indices"] = torch.cat([i for i, _ in self.scores])
            out["scores/values"] = torch.cat([s for _, s in self.scores], 1)
        return out

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> _State:
        def top(name: str) -> _Top:
            return _Top(t[f"{name}/values"], t[f"{name}/indices"], t[f"{name}/layers"])

        state = cls(
            top("top"),
            top("bottom"),
            {b: top(f"band_{b}") for b in BANDS},
            t["count"],
            t["total"],
            t["positive"],
            t["squares"],
        )
        if "scores/indices" in t:
            state.scores.append((t["scores/indices"], t["scores/values"]))
        return state
