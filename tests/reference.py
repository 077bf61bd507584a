"""Independent float64 brute-force references for the engine's tests.

Nothing here uses the engine (capture hooks, layers, curvature, scores): only ``torch`` / ``torch.func`` and the
losses of :mod:`influencer.tasks`. Everything is computed one example at a time in float64 (the model must
already be float64) and is meant for tiny models (P up to ~20k tracked parameters).

**Parameter layout** (the engine uses the same one). Tracked layers are an ordered list of module names, each an
``nn.Linear`` (weight [d_out, d_in]) or a Hugging Face ``Conv1D`` (weight stored [d_in, d_out]), with an optional
bias [d_out]. A layer is the matrix [d_out, d_in + has_bias]: the weight in [d_out, d_in] orientation (Conv1D's
transposed) with the bias as the LAST column. The flat vector is the concatenation, in the given order, of each
matrix flattened row-major. Untracked parameters are held fixed.

The references differentiate a flat vector θ [P] in exactly this layout: θ is split into per-layer matrices,
turned back into weight/bias tensors and substituted with ``torch.func.functional_call``. A module used more
than once in a forward pass therefore gets the sum over its uses; a tracked weight tied to another module
(e.g. a tied lm_head) is substituted only under the tracked name (``tie_weights=False``), i.e. only the tracked
module's own use is differentiated, as a hook on that module would see it.

Conventions (DESIGN.md §1): L(z) = summed NLL, f_q = log p(completion), G = (1/N) Σ_n J_nᵀ H_n J_n (the true
Fisher), I(q, z) = −∇f_qᵀ (G + λI)⁻¹ ∇L(z) (positive = helpful).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, hessian, jacrev

from influencer.tasks import CausalLM, Classification, Regression, Task

try:  # transformers is an optional dependency of the project
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = None

LossKind = Literal["train", "measurement", "sampled"]
Damping = float | Mapping[str, float] | None
Shapes = Sequence[tuple[int, int]]

__all__ = [
    "LayerSpec",
    "block_diagonal",
    "damping_vector",
    "dense_gnh",
    "dense_hessian",
    "diagonal_fisher",
    "ekfac_inverse",
    "ekfac_reference",
    "empirical_fisher",
    "exact_influence",
    "flat_params",
    "influence_by_layer_from_grads",
    "influence_from_grads",
    "join_layers",
    "kron_basis",
    "layer_matrix_shapes",
    "layer_specs",
    "output_hessian",
    "per_example_grads",
    "split_by_layer",
]


# --------------------------------------------------------------------------------------------------------
# Layout
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerSpec:
    """One tracked layer: its module name, kind and matrix shape [d_out, d_in + has_bias]."""

    name: str
    conv1d: bool
    d_out: int
    d_in: int
    has_bias: bool

    @property
    def shape(self) -> tuple[int, int]:
        return (self.d_out, self.d_in + int(self.has_bias))

    @property
    def size(self) -> int:
        return self.d_out * (self.d_in + int(self.has_bias))

    def key(self, param: str, prefix: str = "") -> str:
        """Full parameter name (``prefix`` + module name + param)."""
        return f"{prefix}{self.name}.{param}" if self.name else f"{prefix}{param}"


def layer_specs(model: nn.Module, names: Sequence[str]) -> list[LayerSpec]:
    """The tracked layers, in the given order. Raises on unknown / duplicate names or unsupported modules."""
    if isinstance(names, str):
        raise TypeError("names must be a sequence of module names, not a single string")
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate layer names in {list(names)}")
    modules = dict(model.named_modules())
    specs = []
    for name in names:
        if name not in modules:
            raise ValueError(f"no module named {name!r} in the model")
        m = modules[name]
        if Conv1D is not None and isinstance(m, Conv1D):
            d_in, d_out = m.weight.shape
            specs.append(LayerSpec(name, True, d_out, d_in, m.bias is not None))
        elif isinstance(m, nn.Linear):
            d_out, d_in = m.weight.shape
            specs.append(LayerSpec(name, False, d_out, d_in, m.bias is not None))
        else:
            raise TypeError(f"module {name!r} is a {type(m).__name__}, not nn.Linear or Conv1D")
    return specs


def layer_matrix_shapes(model: nn.Module, names: Sequence[str]) -> list[tuple[int, int]]:
    """[(d_out, d_in + has_bias)] per tracked layer, in order."""
    return [s.shape for s in layer_specs(model, names)]


def split_by_layer(x: Tensor, shapes: Shapes) -> list[Tensor]:
    """Last dim P → list of views [..., d_out, d_in'] (one per layer)."""
    sizes = [a * b for a, b in shapes]
    if x.shape[-1] != sum(sizes):
        raise ValueError(f"last dim is {x.shape[-1]} but the layer shapes {list(shapes)} total {sum(sizes)}")
    return [c.unflatten(-1, s) for c, s in zip(x.split(sizes, dim=-1), shapes, strict=True)]


def join_layers(mats: Sequence[Tensor]) -> Tensor:
    """Inverse of :func:`split_by_layer`: list of [..., d_out, d_in'] → [..., P]."""
    return torch.cat([m.flatten(-2) for m in mats], dim=-1)


def flat_params(model: nn.Module, names: Sequence[str]) -> Tensor:
    """The current tracked parameters θ [P] in the layout (a detached copy)."""
    modules = dict(model.named_modules())
    mats = []
    for spec in layer_specs(model, names):
        m = modules[spec.name]
        w = m.weight.detach()
        w = w.T if spec.conv1d else w
        mats.append(torch.cat([w, m.bias.detach()[:, None]], 1) if spec.has_bias else w)
    return join_layers(mats).clone()


def _overrides(theta: Tensor, specs: Sequence[LayerSpec], prefix: str) -> dict[str, Tensor]:
    """θ [P] → {parameter name: tensor in the module's own orientation}."""
    out: dict[str, Tensor] = {}
    for spec, block in zip(specs, split_by_layer(theta, [s.shape for s in specs]), strict=True):
        w = block[:, : spec.d_in]
        out[spec.key("weight", prefix)] = w.T if spec.conv1d else w
        if spec.has_bias:
            out[spec.key("bias", prefix)] = block[:, spec.d_in]
    return out


def _check_float64(model: nn.Module, specs: Sequence[LayerSpec]) -> None:
    modules = dict(model.named_modules())
    for spec in specs:
        dtype = modules[spec.name].weight.dtype
        if dtype != torch.float64:
            raise ValueError(f"references run in float64 but layer {spec.name!r} is {dtype}; call model.double()")


class _TaskModule(nn.Module):
    """Wraps (model, task) so ``functional_call`` can run ``task.forward``."""

    def __init__(self, model: nn.Module, task: Task):
        super().__init__()
        self.model = model
        self._task = task

    def forward(self, batch: Any) -> Tensor:
        return self._task.forward(self.model, batch)


def _forward_fn(model: nn.Module, task: Task, specs: Sequence[LayerSpec], batch: Any) -> Callable[[Tensor], Tensor]:
    """θ [P] → task outputs for ``batch`` with the tracked layers replaced by θ."""
    wrapper = _TaskModule(model, task)

    def forward(theta: Tensor) -> Tensor:
        return functional_call(wrapper, _overrides(theta, specs, "model."), (batch,), tie_weights=False, strict=False)

    return forward


def _prepare(model: nn.Module, names: Sequence[str]) -> tuple[list[LayerSpec], Tensor]:
    specs = layer_specs(model, names)
    _check_float64(model, specs)
    return specs, flat_params(model, names)


# --------------------------------------------------------------------------------------------------------
# Per-example gradients
# --------------------------------------------------------------------------------------------------------


def _loss_fn(
    task: Task, forward: Callable[[Tensor], Tensor], batch: Any, loss: LossKind, key: Tensor | None
) -> Callable[[Tensor], Tensor]:
    def scalar(theta: Tensor) -> Tensor:
        out = forward(theta)
        if loss == "train":
            v = task.train_loss(out, batch)
        elif loss == "measurement":
            v = task.measurement(out, batch)
        else:
            v = task.sampled_loss(out, batch, key)
        if v.numel() != 1:
            raise ValueError(f"{loss} loss of a single-example batch has shape {tuple(v.shape)}, expected [1]")
        return v.sum()

    return scalar


def per_example_grads(
    model: nn.Module,
    task: Task,
    data: Any,
    names: Sequence[str],
    *,
    loss: LossKind = "train",
    queries: bool = False,
    keys: Tensor | None = None,
) -> Tensor:
    """Per-example gradients [N, P] in the layout, one single-example batch at a time.

    ``loss``: ``"train"`` → ∇L(z) (``task.train_loss``); ``"measurement"`` → ∇f (``task.measurement``, use with
    ``queries=True`` for CausalLM prompt/completion data); ``"sampled"`` → gradient of ``task.sampled_loss`` with
    per-example int64 ``keys`` [N] (labels drawn from the model; pass the same keys the engine uses).
    """
    if loss not in ("train", "measurement", "sampled"):
        raise ValueError(f"loss must be 'train', 'measurement' or 'sampled', not {loss!r}")
    specs, theta0 = _prepare(model, names)
    ds = task.as_dataset(data, queries=queries)
    n = len(ds)
    if loss == "sampled" and (keys is None or keys.shape != (n,)):
        raise ValueError(f"loss='sampled' needs keys of shape [{n}] (one int64 key per example)")
    rows = []
    with torch.no_grad():  # torch.func.grad still differentiates θ; this only stops outer graphs on the params
        for i in range(n):
            batch = task.collate([ds[i]])
            key = keys[i : i + 1] if keys is not None else None
            rows.append(grad(_loss_fn(task, _forward_fn(model, task, specs, batch), batch, loss, key))(theta0))
    return torch.stack(rows) if rows else theta0.new_zeros(0, theta0.numel())


def empirical_fisher(grads: Tensor) -> Tensor:
    """(1/N) Σ_n g_n g_nᵀ from grads [N, P] → [P, P]."""
    return grads.T @ grads / grads.shape[0]


def diagonal_fisher(grads: Tensor) -> Tensor:
    """(1/N) Σ_n g_n⊙² from grads [N, P] → [P] (the diagonal of :func:`empirical_fisher`)."""
    return grads.pow(2).mean(0)


# --------------------------------------------------------------------------------------------------------
# Curvature: exact Gauss-Newton (= true Fisher) and exact Hessian
# --------------------------------------------------------------------------------------------------------


def _is_builtin(task: Task, cls: type) -> bool:
    """True if ``task`` is a ``cls`` whose training loss is the built-in one (closed-form Hessian applies)."""
    t = type(task)
    return isinstance(task, cls) and t.train_loss is Task.train_loss and t.log_likelihood is cls.log_likelihood


def output_hessian(
    task: Task, outputs: Tensor, batch: Any, *, method: Literal["closed_form", "autograd"] = "closed_form"
) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """The Hessian H of one example's training loss w.r.t. its outputs, restricted to the outputs it touches.

    Returns ``(sel, hmul)``: ``sel`` [K] indexes ``outputs.reshape(-1)``; ``hmul(J)`` maps J [K, P] → H[sel, sel] J.
    Closed forms: Regression H = I; Classification H = diag(p) − p pᵀ; CausalLM, per target position t (target at
    t+1, predicted from the logits at t), H_t = diag(p_t) − p_t p_tᵀ and zero elsewhere. ``method="autograd"``
    (and any other task) uses ``torch.func.hessian`` of ``task.train_loss`` w.r.t. the outputs.
    """
    if outputs.shape[0] != 1:
        raise ValueError("output_hessian works on single-example batches")
    flat = outputs.reshape(-1)
    if method == "closed_form" and _is_builtin(task, Regression):
        return torch.arange(flat.numel()), lambda j: j
    if method == "closed_form" and _is_builtin(task, Classification):
        p = torch.softmax(outputs.reshape(-1), -1)[:, None]
        return torch.arange(flat.numel()), lambda j: p * j - p * (p * j).sum(0, keepdim=True)
    if method == "closed_form" and _is_builtin(task, CausalLM):
        v = outputs.shape[-1]
        pos = torch.nonzero(batch["target_mask"][0, 1:].to(outputs.device)).reshape(-1)  # predicting positions
        sel = (pos[:, None] * v + torch.arange(v, device=outputs.device)).reshape(-1)
        p = torch.softmax(outputs[0, pos], -1)[:, :, None]  # [Tt, V, 1]

        def hmul(j: Tensor) -> Tensor:
            jr = j.reshape(len(pos), v, -1)
            return (p * jr - p * (p * jr).sum(1, keepdim=True)).reshape(j.shape)

        return sel, hmul
    if method not in ("closed_form", "autograd"):
        raise ValueError(f"method must be 'closed_form' or 'autograd', not {method!r}")
    h = hessian(lambda o: task.train_loss(o, batch).sum())(outputs.detach())
    h = h.reshape(flat.numel(), flat.numel())
    sel = torch.nonzero((h != 0).any(1)).reshape(-1)
    hs = h[sel][:, sel]
    return sel, lambda j: hs @ j


def dense_gnh(
    model: nn.Module,
    task: Task,
    data: Any,
    names: Sequence[str],
    *,
    queries: bool = False,
    method: Literal["closed_form", "autograd"] = "closed_form",
    chunk_size: int | None = None,
) -> Tensor:
    """Exact Gauss-Newton Hessian G = (1/N) Σ_n J_nᵀ H_n J_n [P, P] over the tracked layers.

    J_n = ∂outputs/∂θ (``torch.func.jacrev``, only the output rows the loss touches), H_n from
    :func:`output_hessian`. For the built-in tasks (matching losses) this is the true Fisher
    (1/N) Σ_n E_ŷ[∇L̂_n ∇L̂_nᵀ] with labels sampled from the model. ``chunk_size`` bounds jacrev's vmap width.
    """
    specs, theta0 = _prepare(model, names)
    ds = task.as_dataset(data, queries=queries)
    g = theta0.new_zeros(theta0.numel(), theta0.numel())
    with torch.no_grad():
        for i in range(len(ds)):
            batch = task.collate([ds[i]])
            forward = _forward_fn(model, task, specs, batch)
            outputs = forward(theta0)
            sel, hmul = output_hessian(task, outputs, batch, method=method)
            if sel.numel() == 0:
                continue
            with warnings.catch_warnings():  # SDPA's backward has no vmap batching rule: slower, still exact
                warnings.filterwarnings("ignore", message=".*batching rule.*")
                jac = jacrev(_selected(forward, sel), chunk_size=chunk_size)(theta0)  # [K, P]
            g += jac.T @ hmul(jac)
    g /= max(len(ds), 1)
    return 0.5 * (g + g.T)


def _selected(forward: Callable[[Tensor], Tensor], sel: Tensor) -> Callable[[Tensor], Tensor]:
    return lambda theta: forward(theta).reshape(-1)[sel]


def dense_hessian(model: nn.Module, task: Task, data: Any, names: Sequence[str]) -> Tensor:
    """Exact Hessian (1/N) Σ_n ∇²_θ L(z_n) [P, P] of the training loss (``torch.func.hessian``; small models)."""
    specs, theta0 = _prepare(model, names)
    ds = task.as_dataset(data)
    h = theta0.new_zeros(theta0.numel(), theta0.numel())
    with torch.no_grad():
        for i in range(len(ds)):
            batch = task.collate([ds[i]])
            h += hessian(_loss_fn(task, _forward_fn(model, task, specs, batch), batch, "train", None))(theta0)
    return h / max(len(ds), 1)


def block_diagonal(g: Tensor, shapes: Shapes) -> Tensor:
    """A copy of g [P, P] with every entry outside the per-layer diagonal blocks set to zero."""
    out = torch.zeros_like(g)
    start = 0
    for a, b in shapes:
        end = start + a * b
        out[start:end, start:end] = g[start:end, start:end]
        start = end
    if start != g.shape[0]:
        raise ValueError(f"layer shapes total {start} but the matrix is {tuple(g.shape)}")
    return out


# --------------------------------------------------------------------------------------------------------
# Influence
# --------------------------------------------------------------------------------------------------------


def damping_vector(
    shapes: Shapes, damping: Damping, names: Sequence[str] | None = None, *, dtype: torch.dtype = torch.float64
) -> Tensor:
    """λ per parameter [P]: a float for every layer, a dict name → float per layer block (needs ``names``), or
    None (zero)."""
    sizes = [a * b for a, b in shapes]
    if damping is None:
        return torch.zeros(sum(sizes), dtype=dtype)
    if isinstance(damping, Mapping):
        if names is None or len(names) != len(shapes):
            raise ValueError("per-layer damping needs the layer names, one per shape")
        missing = [n for n in names if n not in damping]
        extra = [k for k in damping if k not in names]
        if missing or extra:
            raise ValueError(f"damping dict: missing layers {missing}, unknown layers {extra}")
        return torch.cat([torch.full((s,), float(damping[n]), dtype=dtype) for n, s in zip(names, sizes, strict=True)])
    return torch.full((sum(sizes),), float(damping), dtype=dtype)


def influence_from_grads(
    query_grads: Tensor, train_grads: Tensor, curvature: Tensor, damping: Tensor | float
) -> Tensor:
    """I = −∇f ᵀ (G + diag(λ))⁻¹ ∇L: query_grads [Q, P], train_grads [N, P], curvature [P, P], damping [P] or
    a float → [Q, N] (``torch.linalg.solve``, float64)."""
    lam = torch.as_tensor(damping, dtype=curvature.dtype).expand(curvature.shape[0])
    x = torch.linalg.solve(curvature + torch.diag(lam), train_grads.T)  # [P, N]
    return -(query_grads @ x)


def influence_by_layer_from_grads(
    query_grads: Tensor, train_grads: Tensor, curvature: Tensor, damping: Tensor | float, shapes: Shapes
) -> Tensor:
    """Per-layer influence I_l = −∇_l f ᵀ (G_ll + λ_l)⁻¹ ∇_l L → [L, Q, N], using only the diagonal blocks
    G_ll of ``curvature`` (block-diagonal G). Σ_l I_l equals :func:`influence_from_grads` on
    ``block_diagonal(curvature)``."""
    lam = torch.as_tensor(damping, dtype=curvature.dtype).expand(curvature.shape[0])
    out = []
    start = 0
    for q_l, t_l in zip(split_by_layer(query_grads, shapes), split_by_layer(train_grads, shapes), strict=True):
        end = start + q_l[0].numel()
        out.append(
            influence_from_grads(q_l.flatten(-2), t_l.flatten(-2), curvature[start:end, start:end], lam[start:end])
        )
        start = end
    return torch.stack(out)


def exact_influence(
    model: nn.Module,
    task: Task,
    queries: Any,
    train: Any,
    names: Sequence[str],
    *,
    damping: Damping,
    curvature: Tensor | None = None,
) -> Tensor:
    """I(q, z) = −∇f_qᵀ (G + λI)⁻¹ ∇L(z) → [Q, N].

    ∇f_q: gradient of ``task.measurement`` on ``task.as_dataset(queries, queries=True)``; ∇L(z): of
    ``task.train_loss``. ``curvature`` [P, P] (default: :func:`dense_gnh` of ``train``; pass
    ``block_diagonal(G, shapes)`` to compare with the block-diagonal engine). ``damping``: float, dict
    name → float (per layer block), or None.
    """
    shapes = layer_matrix_shapes(model, names)
    if curvature is None:
        curvature = dense_gnh(model, task, train, names)
    gq = per_example_grads(model, task, queries, names, loss="measurement", queries=True)
    gt = per_example_grads(model, task, train, names, loss="train")
    return influence_from_grads(gq, gt, curvature, damping_vector(shapes, damping, names, dtype=curvature.dtype))


# --------------------------------------------------------------------------------------------------------
# EK-FAC in a given Kronecker eigenbasis
# --------------------------------------------------------------------------------------------------------


def kron_basis(q_s: Tensor, q_a: Tensor) -> Tensor:
    """K = kron(Q_S, Q_A) [P_l, P_l]; row-major: vec(Q_Sᵀ M Q_A) = Kᵀ vec(M)."""
    return torch.kron(q_s, q_a)


def ekfac_reference(grads: Tensor, q_s: Tensor, q_a: Tensor) -> Tensor:
    """EK-FAC eigenvalues Λ [d_out, d_in'] = (1/N) Σ_n (Q_Sᵀ G_n Q_A)⊙² = diag(Kᵀ F K) reshaped, from one layer's
    per-example gradients ``grads`` [N, d_out·d_in'] or [N, d_out, d_in'] (F their empirical Fisher)."""
    d_out, d_in = q_s.shape[0], q_a.shape[0]
    g = grads.reshape(grads.shape[0], d_out, d_in)
    return (q_s.T @ g @ q_a).pow(2).mean(0)


def ekfac_inverse(q_s: Tensor, q_a: Tensor, lam: Tensor, damping: float) -> Tensor:
    """Dense (K diag(Λ) Kᵀ + λI)⁻¹ = K diag(1/(Λ + λ)) Kᵀ [P_l, P_l] for orthogonal Q_S, Q_A."""
    k = kron_basis(q_s, q_a)
    return (k / (lam.reshape(-1) + damping)) @ k.T
