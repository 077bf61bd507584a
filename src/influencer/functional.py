"""A model as a pure function of one flat parameter vector θ (the tracked layers), via ``torch.func``.

The references of the validation suite (exact damped Gauss-Newton influence, LiSSA, PBRF) and the full-GNH
refinement of :mod:`influencer.refine` work on a flat θ [P] that concatenates, for every tracked layer in order,
``weight.flatten()`` then ``bias`` (each in the module's own orientation). They never use the engine's hooks, so
the validation suite checks the engine independently. Parameters outside the tracked layers stay fixed at their
current values. :meth:`FlatModel.layer_matrices` / :meth:`FlatModel.flat` convert to and from the engine's
per-layer gradient matrices [..., d_out, d_in + bias].

Quantities (DESIGN.md §1): per-example training loss L(z) (``task.train_loss``, a sum over targets),
measurement f(θ) (``task.measurement``), and the Bregman divergence of the output loss

    B(θ) = (1/N) Σ_i D_L(h(θ, x_i), h(θ_s, x_i)),

½‖h − h_s‖² for Gaussian regression, KL(p_s ‖ p_θ) for softmax cross-entropy and the sum over target tokens of
that KL for causal LMs (any other task: the generic L(h) − L(h_s) − ⟨∇_h L(h_s), h − h_s⟩). Its Hessian at
θ_s is exactly the Gauss-Newton matrix G = (1/N) Σ J_iᵀ H_i J_i (∂D/∂h vanishes at h_s), so the GNH-vector
products below are Hessian-vector products of B at θ_s.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from influencer.layers import LayerSpec, select_layers
from influencer.passes import model_device
from influencer.tasks import CausalLM, Classification, Regression, Task

__all__ = ["FlatModel", "bregman_divergence", "iter_batches", "output_hessian_product", "take"]


class _TaskModule(nn.Module):
    """(model, task) as one module so ``functional_call`` can run ``task.forward``."""

    def __init__(self, model: nn.Module, task: Task):
        super().__init__()
        self.model = model
        self._task = task

    def forward(self, batch: Any) -> Tensor:
        return self._task.forward(self.model, batch)


def _unsqueeze(x: Any) -> Any:
    if isinstance(x, Tensor):
        return x.unsqueeze(0)
    if isinstance(x, dict):
        return {k: _unsqueeze(v) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_unsqueeze(v) for v in x)
    return x


def take(batch: Any, idx: Tensor) -> Any:
    """Rows ``idx`` of a collated batch (tensors, dicts and tuples of tensors with a leading batch dim)."""
    if isinstance(batch, Tensor):
        return batch[idx.to(batch.device)]
    if isinstance(batch, dict):
        return {k: take(v, idx) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(take(v, idx) for v in batch)
    return batch


def iter_batches(
    task: Task, data: Any, batch_size: int, *, queries: bool = False, indices: Sequence[int] | Tensor | None = None
) -> Iterator[tuple[Tensor, Any]]:
    """(indices [B], collated batch) over ``data`` (or over ``indices`` of it), in order."""
    ds = task.as_dataset(data, queries=queries)
    idx = torch.arange(len(ds)) if indices is None else torch.as_tensor(indices, dtype=torch.long)  # type: ignore[arg-type]
    for lo in range(0, len(idx), batch_size):
        chunk = idx[lo : lo + batch_size]
        yield chunk, task.collate([ds[int(i)] for i in chunk])


class FlatModel:
    """``model`` restricted to its tracked layers, as functions of a flat θ [P].

    layers: which layers are free parameters (same spec as the engine: preset, names, regex, predicate).
    ``theta0`` is a detached copy of their current values; ``P`` their count; ``covers_all`` tells whether
    they are every trainable parameter of the model (then the PBRF proximity term is over all parameters).
    """

    def __init__(self, model: nn.Module, task: Task, layers: LayerSpec = "all"):
        self.model, self.task = model, task
        self.layers = select_layers(model, layers)
        self.wrapper = _TaskModule(model, task)
        self.keys: list[str] = []
        self.shapes: list[torch.Size] = []
        for layer in self.layers:
            for pname in ("weight", "bias"):
                p = getattr(layer.module, pname, None)
                if isinstance(p, Tensor):
                    self.keys.append(f"model.{layer.name}.{pname}" if layer.name else f"model.{pname}")
                    self.shapes.append(p.shape)
        self.sizes = [int(torch.Size(s).numel()) for s in self.shapes]
        self.theta0 = torch.cat(
            [
                getattr(x.module, p).detach().reshape(-1)
                for x in self.layers
                for p in ("weight", "bias")
                if isinstance(getattr(x.module, p, None), Tensor)
            ]
        ).clone()
        tracked = {
            id(getattr(x.module, p))
            for x in self.layers
            for p in ("weight", "bias")
            if isinstance(getattr(x.module, p, None), Tensor)
        }
        self.covers_all = all(id(p) in tracked for p in model.parameters() if p.requires_grad)
        self.device = model_device(model)

    def damping_vector(self, damping: float | dict[str, float]) -> Tensor:
        """λ per parameter [P] from one value or a dict layer name → λ_l (every tracked layer)."""
        if isinstance(damping, dict):
            missing = [x.name for x in self.layers if x.name not in damping]
            if missing:
                raise ValueError(f"damping has no value for tracked layers {missing}")
            parts = []
            for x in self.layers:
                size = x.d_out * x.width
                parts.append(torch.full((size,), float(damping[x.name]), dtype=self.dtype))
            return torch.cat(parts).to(self.device)
        return torch.full((self.P,), float(damping), dtype=self.dtype, device=self.device)

    def layer_matrices(self, v: Tensor) -> dict[str, Tensor]:
        """Flat vectors [K, P] → the engine's per-layer matrices name → [K, d_out, d_in + bias] (bias last)."""
        out, lo = {}, 0
        for x in self.layers:
            w = v[:, lo : lo + x.d_out * x.d_in]
            lo += x.d_out * x.d_in
            w = w.reshape(-1, x.d_in, x.d_out).transpose(1, 2) if x.kind == "conv1d" else w.reshape(-1, x.d_out, x.d_in)
            if x.bias:
                w = torch.cat([w, v[:, lo : lo + x.d_out, None]], -1)
                lo += x.d_out
            out[x.name] = w
        return out

    def flat(self, mats: dict[str, Tensor]) -> Tensor:
        """The inverse of :meth:`layer_matrices`: name → [K, d_out, d_in + bias] → flat vectors [K, P]."""
        parts = []
        for x in self.layers:
            m = mats[x.name]
            w = m[..., : x.d_in]
            parts.append((w.transpose(1, 2) if x.kind == "conv1d" else w).reshape(len(m), -1))
            if x.bias:
                parts.append(m[..., x.d_in])
        return torch.cat(parts, 1)

    @property
    def P(self) -> int:
        return self.theta0.numel()

    @property
    def dtype(self) -> torch.dtype:
        return self.theta0.dtype

    @property
    def layer_names(self) -> list[str]:
        return [x.name for x in self.layers]

    # --- evaluation ------------------------------------------------------------------------------------
    def params(self, theta: Tensor) -> dict[str, Tensor]:
        return {k: t.view(s) for k, t, s in zip(self.keys, theta.split(self.sizes), self.shapes, strict=True)}

    def outputs(self, theta: Tensor, batch: Any) -> Tensor:
        """Task outputs (logits / predictions) with the tracked layers set to θ."""
        return functional_call(self.wrapper, self.params(theta), (batch,), tie_weights=False, strict=False)

    def train_loss(self, theta: Tensor, batch: Any) -> Tensor:
        """Per-example L(z) [B]."""
        return self.task.train_loss(self.outputs(theta, batch), batch)

    def measurement(self, theta: Tensor, batch: Any) -> Tensor:
        """Per-query f(θ) [B]."""
        return self.task.measurement(self.outputs(theta, batch), batch)

    def bregman(self, outputs: Tensor, ref: Tensor, batch: Any) -> Tensor:
        """Per-example D_L(h, h_s) [B] for outputs ``outputs`` and reference outputs ``ref``."""
        return bregman_divergence(self.task, outputs, ref, batch)

    # --- data helpers ----------------------------------------------------------------------------------
    def to(self, batch: Any) -> Any:
        return self.task.to(batch, self.device)

    def batches(
        self, data: Any, batch_size: int, *, queries: bool = False, indices: Sequence[int] | Tensor | None = None
    ) -> list[tuple[Tensor, Any]]:
        return [(i, self.to(b)) for i, b in iter_batches(self.task, data, batch_size, queries=queries, indices=indices)]

    def collate_all(self, data: Any) -> Any:
        """The whole data set as one collated batch on the model's device."""
        ds = self.task.as_dataset(data)
        return self.to(self.task.collate([ds[i] for i in range(len(ds))]))  # type: ignore[arg-type]

    def reference_outputs(self, batches: list[tuple[Tensor, Any]], theta: Tensor | None = None) -> list[Tensor]:
        """h(θ_s, x) for each batch (detached)."""
        theta = self.theta0 if theta is None else theta
        with torch.no_grad():
            return [self.outputs(theta, b).detach() for _, b in batches]

    # --- gradients -------------------------------------------------------------------------------------
    @torch.no_grad()  # torch.func.grad still differentiates θ; this stops graphs over untracked parameters
    def per_example_grads(self, batch: Any, kind: str = "train", theta: Tensor | None = None) -> Tensor:
        """Per-example ∇L(z) (``kind="train"``) or ∇f (``"measurement"``) of one collated batch: [B, P]."""
        theta = self.theta0 if theta is None else theta
        fn = self.train_loss if kind == "train" else self.measurement

        def single(th: Tensor, example: Any) -> Tensor:
            return fn(th, _unsqueeze(example)).sum()

        return vmap(grad(single), in_dims=(None, 0))(theta, batch)

    @torch.no_grad()
    def gnh_vp(self, vs: Tensor, batches: list[tuple[Tensor, Any]], refs: list[Tensor] | None, n: int) -> Tensor:
        """G v for v [P] or [K, P]: (1/n) Σ over the given batches of Jᵀ H J v.

        J v by forward mode, H = the Hessian of the Bregman term in output space at h_s (= the loss Hessian),
        Jᵀ by reverse mode; all K vectors in one vectorised pass. refs: h_s per batch, or None to take h_s from
        the reverse-mode pass itself (θ = θ_s there; saves holding the outputs of every batch).
        """
        single = vs.dim() == 1
        vs2 = vs[None] if single else vs
        out = torch.zeros_like(vs2)
        theta = self.theta0
        for i, (_, b) in enumerate(batches):

            def f(th: Tensor, b=b) -> Tensor:
                return self.outputs(th, b)

            # the math attention kernel: fused CPU/GPU attention kernels have no forward-mode derivative
            with sdpa_kernel(SDPBackend.MATH):
                primal, vjp_fn = vjp(f, theta)
                ref = primal.detach() if refs is None else refs[i]
                jv = vmap(lambda v, f=f: jvp(f, (theta,), (v,))[1])(vs2)
                out += vmap(vjp_fn)(output_hessian_product(self.task, ref, b, jv))[0]
        out /= n
        return out[0] if single else out


def output_hessian_product(task: Task, h_s: Tensor, batch: Any, u: Tensor) -> Tensor:
    """H u for u [K, *h_s.shape]: the Hessian of D_L(·, h_s) at h_s (= the loss Hessian in output space).

    Closed forms for the built-in tasks (identity; diag(p) − ppᵀ per example / per target position), else
    forward-over-reverse autograd of the Bregman divergence.
    """
    t = type(task)
    if isinstance(task, Regression) and t.log_likelihood is Regression.log_likelihood:
        return u
    if isinstance(task, Classification) and t.log_likelihood is Classification.log_likelihood:
        p = torch.softmax(h_s, -1)
        return p * u - p * (p * u).sum(-1, keepdim=True)
    if isinstance(task, CausalLM) and t.log_likelihood is CausalLM.log_likelihood:
        p = torch.softmax(h_s, -1)
        mask = torch.zeros(h_s.shape[:2], dtype=h_s.dtype, device=h_s.device)
        mask[:, :-1] = batch["target_mask"][:, 1:].to(h_s.device, h_s.dtype)
        return (p * u - p * (p * u).sum(-1, keepdim=True)) * mask[..., None]

    def dgrad(o: Tensor) -> Tensor:
        return grad(lambda oo: bregman_divergence(task, oo, h_s, batch).sum())(o)

    return vmap(lambda w: jvp(dgrad, (h_s,), (w,))[1])(u)


def bregman_divergence(task: Task, h: Tensor, h_s: Tensor, batch: Any) -> Tensor:
    """D_L(h, h_s) per example [B]: the output-space Bregman divergence of the task's training loss."""
    t = type(task)
    if isinstance(task, Regression) and t.log_likelihood is Regression.log_likelihood:
        return 0.5 * (h - h_s).pow(2).reshape(len(h), -1).sum(1)
    if isinstance(task, Classification) and t.log_likelihood is Classification.log_likelihood:
        logp_s = F.log_softmax(h_s, -1)
        return (logp_s.exp() * (logp_s - F.log_softmax(h, -1))).sum(-1)
    if isinstance(task, CausalLM) and t.log_likelihood is CausalLM.log_likelihood:
        mask = batch["target_mask"][:, 1:].to(h.device, h.dtype)
        logp_s = F.log_softmax(h_s[:, :-1], -1)
        kl = (logp_s.exp() * (logp_s - F.log_softmax(h[:, :-1], -1))).sum(-1)
        return (kl * mask).sum(1)
    return _generic_bregman(task, h, h_s, batch)


def _generic_bregman(task: Task, h: Tensor, h_s: Tensor, batch: Any) -> Tensor:
    """L(h) − L(h_s) − ⟨∇_h L(h_s), h − h_s⟩ per example (any task whose loss is convex in the outputs)."""

    def total(o: Tensor) -> Tensor:
        return task.train_loss(o, batch).sum()

    g_s = grad(total)(h_s.detach()).detach()
    diff = (h - h_s).reshape(len(h), -1)
    return task.train_loss(h, batch) - task.train_loss(h_s, batch) - (g_s.reshape(len(h), -1) * diff).sum(1)
