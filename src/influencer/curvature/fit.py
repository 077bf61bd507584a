"""Fitting passes: covariances A and S per token, eigenbases in float64, Λ per sequence.

Pass costs (B sequences of T tokens, a layer [d_out, w]): the covariance pass adds T·(w² + d_out²) per
sequence to a forward+backward; the EK-FAC Λ pass rotates tokens into the eigenbasis (or forms the per-sequence
gradient and rotates it, whichever is cheaper) and squares. Neither pass computes parameter gradients.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from influencer.curvature.core import (
    FISHERS,
    STRATEGIES,
    Curvature,
    LayerFactors,
    model_fingerprint,
    resolve_damping,
)
from influencer.curvature.linalg import (
    accumulate_squared_grads,
    block_covariance,
    eigh_blocks,
    rotate,
    rotate_tokens_first,
    split_sizes,
)
from influencer.layers import Layer, LayerSpec, select_layers
from influencer.passes import amp_aware, batches, compute_dtype, eval_mode, layer_io
from influencer.progress import progress_bar
from influencer.tasks import Task

# label-sampling streams: each pass draws independent labels
_STREAM_COVARIANCE, _STREAM_LAMBDA, _STREAM_DIAGONAL = 1, 2, 3


@amp_aware
def fit_curvature(
    model: nn.Module,
    task: Task,
    train: Any,
    *,
    strategy: str = "ekfac",
    fisher: str = "true",
    damping: float | None = None,
    damping_factor: float = 0.1,
    layers: LayerSpec = None,
    blocks: int = 1,
    batch_size: int = 64,
    n_train: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> Curvature:
    """Fit the damped block-diagonal curvature of the tracked layers on ``train``.

    strategy: "ekfac" (default), "kfac", "diagonal" or "identity".
    fisher: "true" (labels sampled from the model, the default) or "empirical" (the data's labels).
    damping: None → ``damping_factor`` × mean(Λ_l) per layer (paper §5), or one absolute value.
    layers: a preset ("mlp", "attention", "all"), names, a regex or a predicate; None → the task's default
        ("mlp" for Hugging Face causal LMs, "all" otherwise).
    blocks: split A and S into this many equal diagonal blocks (paper App. A); memory ÷ blocks.
    n_train: training-set size N for per-copy units (default: the number of fitting sequences).
    seed: seeds the sampled labels; results do not depend on batch size or padding.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if fisher not in FISHERS:
        raise ValueError(f"fisher must be one of {FISHERS}, got {fisher!r}")
    if damping_factor <= 0:
        raise ValueError(f"damping_factor must be > 0, got {damping_factor}")
    tracked = select_layers(model, layers if layers is not None else task.default_layers(model))
    dataset = task.as_dataset(train)
    n = len(dataset)  # type: ignore[arg-type]
    if n == 0:
        raise ValueError("the training data is empty")
    for layer in tracked:
        split_sizes(layer.width, blocks)
        split_sizes(layer.d_out, blocks)
    loss = "sampled" if fisher == "true" else "train"
    factors = {x.name: LayerFactors(x.name, x.kind, x.d_out, x.d_in, x.bias) for x in tracked}
    run = _Run(model, task, tracked, dataset, batch_size, loss, seed, progress)
    with eval_mode(model):
        if strategy == "diagonal":
            run.diagonal(factors)
        elif strategy in ("kfac", "ekfac"):
            run.covariance(factors, blocks)
            if strategy == "kfac":
                run.kfac_eigenvalues(factors)
            else:
                run.ekfac_eigenvalues(factors)
    for f in factors.values():
        f.damping = resolve_damping(strategy, f.lam, damping, damping_factor)
    return Curvature(strategy=strategy, fisher=fisher, blocks=blocks, n_fit=n,
                     n_train=n if n_train is None else int(n_train), damping=damping,
                     damping_factor=damping_factor, layers=factors, fingerprint=model_fingerprint(tracked),
                     seed=seed)


class _Run:
    """State shared by the passes of one fit."""

    def __init__(self, model: nn.Module, task: Task, layers: list[Layer], dataset: Any, batch_size: int,
                 loss: str, seed: int, progress: bool):
        self.model, self.task, self.layers, self.dataset = model, task, layers, dataset
        self.batch_size, self.loss, self.seed, self.progress = batch_size, loss, seed, progress
        self.dtype = compute_dtype(model)
        self.n = len(dataset)

    def _pass(self, desc: str, stream: int):
        for idx, batch in batches(self.dataset, self.task, self.batch_size, desc=desc, progress=self.progress):
            yield layer_io(self.model, self.task, self.layers, batch, idx, loss=self.loss, seed=self.seed,
                           stream=stream)

    def covariance(self, factors: dict[str, LayerFactors], blocks: int) -> None:
        """A = mean ā āᵀ and S = mean g gᵀ over unmasked tokens, eigendecomposed block by block (float64).

        Layers fed the same input in every batch (gate_proj and up_proj) share one A sum and one eigenbasis.
        """
        sizes = {x.name: (split_sizes(x.width, blocks), split_sizes(x.d_out, blocks)) for x in self.layers}
        a_sum: dict[str, list[torch.Tensor]] = {}
        s_sum: dict[str, list[torch.Tensor]] = {}
        a_owner: dict[str, str] = {}  # layer → the layer whose A sum it shares (itself if none)
        tokens = dict.fromkeys(sizes, 0)
        for io in self._pass("covariance", _STREAM_COVARIANCE):
            if not a_owner:
                first_seen: dict[int, str] = {}
                a_owner = {name: first_seen.setdefault(id(x.a), name) for name, x in io.items()}
            for name, owner in a_owner.items():
                if owner != name and io[name].a is not io[owner].a:  # sharing broke: take a private copy
                    a_sum[name] = [c.clone() for c in a_sum[owner]]
                    a_owner[name] = name
            for name, x in io.items():
                if a_owner[name] == name:
                    a_sum[name] = block_covariance(x.a.reshape(-1, x.a.shape[-1]), sizes[name][0], self.dtype,
                                                   a_sum.get(name))
                s_sum[name] = block_covariance(x.g.reshape(-1, x.g.shape[-1]), sizes[name][1], self.dtype,
                                               s_sum.get(name))
                tokens[name] += x.tokens
        eig_a_of: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        with progress_bar("eigendecomposition", len(factors), unit="layers", enabled=self.progress) as bar:
            for name, f in factors.items():
                count = max(1, tokens[name])
                owner = a_owner[name]
                if owner not in eig_a_of:
                    eig, q = eigh_blocks([c / count for c in a_sum[owner]])
                    eig_a_of[owner] = (eig, [v.to(self.dtype).cpu() for v in q])
                eig_a, qa = eig_a_of[owner]
                eig_s, qs = eigh_blocks([c / count for c in s_sum[name]])
                f.tokens = tokens[name]
                f.qa = qa
                f.qs = [q.to(self.dtype).cpu() for q in qs]
                f.eig_a = torch.cat(eig_a).cpu()
                f.eig_s = torch.cat(eig_s).cpu()
                bar.update(1)

    def kfac_eigenvalues(self, factors: dict[str, LayerFactors]) -> None:
        """Λ = T̄ · (λ_S ⊗ λ_A), T̄ = mean unmasked tokens per sequence (per-sequence scale, like EK-FAC)."""
        for f in factors.values():
            assert f.eig_a is not None and f.eig_s is not None
            lam_a = f.eig_a.clamp_min(0)
            lam_s = f.eig_s.clamp_min(0)
            f.lam = ((f.tokens / self.n) * torch.outer(lam_s, lam_a)).to(self.dtype)

    def ekfac_eigenvalues(self, factors: dict[str, LayerFactors]) -> None:
        """Λ = (1/N) Σ_n (Q_Sᵀ Ĝ_n Q_A)⊙², fitted on per-sequence gradients."""
        self._squared_grads_pass(factors, "eigenvalue correction", _STREAM_LAMBDA, rotated=True)

    def diagonal(self, factors: dict[str, LayerFactors]) -> None:
        """Λ = (1/N) Σ_n Ĝ_n⊙² in the standard basis."""
        tokens = self._squared_grads_pass(factors, "diagonal", _STREAM_DIAGONAL, rotated=False)
        for name, f in factors.items():
            f.tokens = tokens[name]

    def _squared_grads_pass(self, factors: dict[str, LayerFactors], desc: str, stream: int,
                            rotated: bool) -> dict[str, int]:
        """Accumulate Σ_n (per-sequence gradient, optionally in the eigenbasis)⊙² into f.lam; returns tokens."""
        acc_t: dict[str, torch.Tensor] = {}  # transposed accumulators [w, d_out]
        bases: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        tokens = dict.fromkeys(factors, 0)
        for io in self._pass(desc, stream):
            rotated_inputs: dict[tuple[int, int], torch.Tensor] = {}  # (id ā, id Q_A) → ā Q_A, shared inputs
            for name, x in io.items():
                f = factors[name]
                a, g = x.a.to(self.dtype), x.g.to(self.dtype)
                if name not in acc_t:
                    acc_t[name] = torch.zeros(f.shape[::-1], dtype=self.dtype, device=a.device)
                    if rotated:
                        assert f.qa is not None and f.qs is not None
                        bases[name] = ([q.to(a.device) for q in f.qs], [q.to(a.device) for q in f.qa])
                qs, qa = bases[name] if rotated else (None, None)
                rotated_a = None
                if rotated and rotate_tokens_first(a.shape[1], f.d_out, a.shape[2]):
                    key = (id(x.a), id(f.qa[0]))  # type: ignore[index]
                    if key not in rotated_inputs:
                        rotated_inputs[key] = rotate(a, qa)  # type: ignore[arg-type]
                    rotated_a = rotated_inputs[key]
                accumulate_squared_grads(acc_t[name], a, g, qs, qa, rotated_a)
                tokens[name] += x.tokens
        for name, f in factors.items():
            f.lam = (acc_t[name].T / self.n).contiguous().cpu()
        return tokens
