"""Independent float64 brute-force references for the engine's tests.

Nothing here imports ``influencer``: the data formats, the token masks, the losses, the measurement and the
sampled labels of the true Fisher are written out below from their definitions (DESIGN.md §1 and the task
docstrings), and every quantity is computed one example at a time with ``torch`` / ``torch.func`` / plain
autograd in float64 (the model must already be float64). Meant for tiny models (P up to ~20k tracked parameters).

**Tasks.** The functions take a task: the engine's ``Regression`` / ``Classification`` / ``CausalLM`` objects (read
by class name only, never called) or the strings ``"regression"``, ``"classification"``, ``"causal_lm"``:

- regression: L = ½‖y − h‖² (unit-variance Gaussian), f = −½‖y_q − h_q‖²;
- classification: L = −log softmax(h)_y, f = log softmax(h_q)_{y_q};
- causal_lm: a sequence is its real tokens (``attention_mask``; padding dropped). Training targets are the tokens
  at positions t ≥ 1 (and ``loss_mask`` = 1), each predicted from the logits at t − 1; L = Σ_targets −log p.
  Query targets are the completion (positions ≥ ``prompt_length``, or ``completion_mask``; never position 0);
  f = Σ_completion log p. Models are called on one unpadded sequence (Hugging Face models with an all-ones
  attention mask and ``use_cache=False``).

**Sampled labels** (true Fisher, ``loss="sampled"``) are drawn from the model by inverse CDF with counter-based
uniforms: one int64 key per example (:func:`example_keys`), uniform u(key, position, salt) from the splitmix64
finaliser (written here with Python integers), categorical ŷ = the first class whose CDF reaches u·CDF_last,
Gaussian noise by Box-Muller from salts 1 and 2. Position j of a sequence is the prediction made from the
logits at j (of token j + 1).

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

**Per-token quantities** (Kronecker factors, token attributions) come from hooks written here: each use of a
tracked module records its input a_t and adds a zero tensor δ to its output, so g_t = ∂L/∂δ_t is the output
pre-activation gradient at token t; ā_t = [a_t; 1] when the layer has a bias. Tokens are (use, real position)
pairs.

Conventions (DESIGN.md §1): L(z) = summed NLL, f_q = log p(completion), G = (1/N) Σ_n J_nᵀ H_n J_n (the true
Fisher), I(q, z) = −∇f_qᵀ (G + λI)⁻¹ ∇L(z) (positive = helpful).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, hessian, jacrev

try:  # transformers is an optional dependency of the project
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = None

LossKind = Literal["train", "measurement", "sampled"]
Damping = float | Mapping[str, float] | None
Shapes = Sequence[tuple[int, int]]
Kind = Literal["regression", "classification", "causal_lm"]

__all__ = [
    "Example",
    "KronFactors",
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
    "example_keys",
    "examples",
    "flat_params",
    "forward",
    "influence_by_layer_from_grads",
    "influence_from_grads",
    "join_layers",
    "kron_basis",
    "kronecker_factors",
    "layer_matrix_shapes",
    "layer_specs",
    "loss_value",
    "output_hessian",
    "per_example_grads",
    "split_by_layer",
    "strategy_curvature",
    "task_kind",
    "token_influence",
    "token_io",
    "uniform",
]


# --------------------------------------------------------------------------------------------------------
# Tasks, examples and masks
# --------------------------------------------------------------------------------------------------------

_KINDS = {"Regression": "regression", "Classification": "classification", "CausalLM": "causal_lm"}


def task_kind(task: Any) -> Kind:
    """The task's kind ("regression", "classification" or "causal_lm") from a kind string or an engine task object
    (by class name; a subclass is refused: it may redefine the losses this module writes out)."""
    if isinstance(task, str):
        if task not in _KINDS.values():
            raise ValueError(f"unknown task kind {task!r}; use one of {sorted(_KINDS.values())}")
        return task  # type: ignore[return-value]
    name = type(task).__name__
    if name not in _KINDS:
        raise TypeError(f"the references know the built-in tasks {sorted(_KINDS)} only, not {name}")
    return _KINDS[name]  # type: ignore[return-value]


@dataclass(frozen=True)
class Example:
    """One example as a batch of one. Supervised: ``x`` [1, ...] inputs, ``y`` [1, ...] targets.
    causal_lm: ``x`` [1, T] the real token ids, ``y`` [1, T] bool, True where the token is a target."""

    kind: str
    x: Tensor
    y: Tensor

    @property
    def positions(self) -> int:
        """Token positions per use of a layer: T for a sequence, 1 for a supervised example."""
        return self.x.shape[1] if self.kind == "causal_lm" else 1


def _row(data: Mapping[str, Any], i: int, n: int) -> dict[str, Any]:
    out = {}
    for key, value in data.items():
        scalar = isinstance(value, int) or (isinstance(value, Tensor) and value.ndim == 0)
        if not scalar and len(value) != n:
            raise ValueError(f"'{key}' has {len(value)} rows but 'input_ids' has {n}")
        out[key] = value if scalar else value[i]
    return out


def _sequence(row: Mapping[str, Any] | Tensor, queries: bool) -> Example:
    """One token sequence: its real tokens and its target mask (the definitions in the module docstring)."""
    if isinstance(row, Tensor):
        row = {"input_ids": row}
    ids = torch.as_tensor(row["input_ids"], dtype=torch.long).reshape(-1)
    length = len(ids)
    if row.get("attention_mask") is not None:
        length = int(torch.as_tensor(row["attention_mask"]).reshape(-1).bool().sum())
    ids = ids[:length]
    pos = torch.arange(length)
    if queries:
        if row.get("completion_mask") is not None:
            target = torch.as_tensor(row["completion_mask"]).reshape(-1)[:length].bool().clone()
        else:
            target = pos >= int(row["prompt_length"])
        target[0] = False  # nothing predicts the first token
    else:
        target = pos >= 1
        if row.get("loss_mask") is not None:
            target = target & torch.as_tensor(row["loss_mask"]).reshape(-1)[:length].bool()
    return Example("causal_lm", ids[None], target[None])


def examples(task: Any, data: Any, *, queries: bool = False) -> list[Example]:
    """User data → a list of single examples (supervised: (X, Y) tensors or a sequence of (x, y) pairs;
    causal_lm: an id tensor [N, T], a dict of per-row columns (scalars broadcast) or a list of per-row dicts)."""
    kind = task_kind(task)
    if kind != "causal_lm":
        if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
            x, y = data
            return [Example(kind, x[i : i + 1], y[i : i + 1]) for i in range(len(x))]
        return [Example(kind, torch.as_tensor(x)[None], torch.as_tensor(y)[None]) for x, y in data]
    if isinstance(data, Tensor):
        data = {"input_ids": data}
    if isinstance(data, Mapping):
        n = len(data["input_ids"])
        return [_sequence(_row(data, i, n), queries) for i in range(n)]
    return [_sequence(row, queries) for row in data]


def _logits(out: Any) -> Tensor:
    if isinstance(out, Tensor):
        return out
    if isinstance(getattr(out, "logits", None), Tensor):
        return out.logits
    return out[0]


def forward(model: nn.Module, ex: Example) -> Tensor:
    """The model's outputs for one example: [1, ...] (supervised) or logits [1, T, V]."""
    if ex.kind != "causal_lm":
        return _logits(model(ex.x))
    if hasattr(model, "config") and hasattr(model, "get_output_embeddings"):  # a Hugging Face model
        return _logits(model(input_ids=ex.x, attention_mask=torch.ones_like(ex.x), use_cache=False))
    return _logits(model(ex.x))


# --------------------------------------------------------------------------------------------------------
# Counter-based random numbers (sampled labels), in plain Python integers
# --------------------------------------------------------------------------------------------------------

_U64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_M1, _M2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def _splitmix(x: int) -> int:
    """The splitmix64 finaliser on an unsigned 64-bit integer."""
    x &= _U64
    x = ((x ^ (x >> 30)) * _M1) & _U64
    x = ((x ^ (x >> 27)) * _M2) & _U64
    return x ^ (x >> 31)


def _signed(x: int) -> int:
    return x - (1 << 64) if x >= 1 << 63 else x


def example_keys(seed: int, stream: int, indices: Sequence[int] | Tensor) -> Tensor:
    """int64 key per example: mix(mix(seed·φ + stream) + index·φ), φ = 0x9E3779B97F4A7C15 (arithmetic mod 2⁶⁴)."""
    base = _splitmix(seed * _GOLDEN + stream)
    return torch.tensor([_signed(_splitmix(base + int(i) * _GOLDEN)) for i in indices], dtype=torch.int64)


def uniform(key: int, position: int, salt: int = 0) -> float:
    """u ∈ (0, 1) for (key, position, salt): (the top 53 bits of mix(key + (position + 1 + salt·1000003)·φ) + ½)/2⁵³."""
    x = _splitmix(int(key) + (position + 1 + salt * 1_000_003) * _GOLDEN)
    return ((x >> 11) + 0.5) / float(1 << 53)


def _normal(key: int, position: int) -> float:
    u1, u2 = uniform(key, position, 1), uniform(key, position, 2)
    return math.sqrt(-2.0 * math.log(u1)) * math.cos(2.0 * math.pi * u2)


def _inverse_cdf(probs: Tensor, u: float) -> int:
    """The first class c with CDF_c ≥ u · CDF_last."""
    cdf = probs.cumsum(0)
    return min(int((cdf < u * cdf[-1]).sum()), len(probs) - 1)


def _sampled_labels(ex: Example, outputs: Tensor, key: int) -> Tensor:
    """Labels drawn from the model for one example (a constant: no gradient flows through the draw)."""
    with torch.no_grad():
        if ex.kind == "regression":
            flat = outputs.reshape(-1)
            noise = torch.tensor([_normal(key, j) for j in range(flat.numel())], dtype=flat.dtype)
            return (flat + noise).reshape(outputs.shape)
        if ex.kind == "classification":
            return torch.tensor([_inverse_cdf(torch.softmax(outputs[0], -1), uniform(key, 0))])
        probs = torch.softmax(outputs[0, :-1], -1)  # row j predicts token j + 1
        return torch.tensor([_inverse_cdf(probs[j], uniform(key, j)) for j in range(len(probs))])


# --------------------------------------------------------------------------------------------------------
# Losses (one example → a scalar)
# --------------------------------------------------------------------------------------------------------


def _log_likelihood(ex: Example, outputs: Tensor, labels: Tensor | None = None) -> Tensor:
    """log p(labels | inputs), summed over the example's targets (labels default to the data's)."""
    if ex.kind == "regression":
        y = (ex.y if labels is None else labels).to(outputs.dtype).reshape(outputs.shape)
        return -0.5 * (y - outputs).pow(2).sum()
    if ex.kind == "classification":
        y = int((ex.y if labels is None else labels).reshape(-1)[0])
        return torch.log_softmax(outputs[0], -1)[y]
    logp = torch.log_softmax(outputs[0, :-1], -1)  # [T-1, V]: row j is p(token j+1 | tokens ≤ j)
    tokens = ex.x[0, 1:] if labels is None else labels
    mask = ex.y[0, 1:]
    return logp.gather(1, tokens[:, None])[:, 0][mask].sum()


def loss_value(ex: Example, outputs: Tensor, loss: LossKind, key: int | None = None) -> Tensor:
    """The scalar of one example: "train" L(z) = −log p(y|x); "measurement" f = log p (of the query targets,
    use examples built with ``queries=True``); "sampled" −log p(ŷ|x) with ŷ drawn from the model under ``key``."""
    if loss == "train":
        return -_log_likelihood(ex, outputs)
    if loss == "measurement":
        return _log_likelihood(ex, outputs)
    if loss == "sampled":
        if key is None:
            raise ValueError("loss='sampled' needs a key")
        return -_log_likelihood(ex, outputs, _sampled_labels(ex, outputs, key))
    raise ValueError(f"loss must be 'train', 'measurement' or 'sampled', not {loss!r}")


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


class _Wrapped(nn.Module):
    """Holds the model so ``functional_call`` can run :func:`forward` on one example."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ex: Example) -> Tensor:
        return forward(self.model, ex)


def _forward_fn(model: nn.Module, specs: Sequence[LayerSpec], ex: Example) -> Callable[[Tensor], Tensor]:
    """θ [P] → outputs for ``ex`` with the tracked layers replaced by θ."""
    wrapper = _Wrapped(model)

    def run(theta: Tensor) -> Tensor:
        return functional_call(wrapper, _overrides(theta, specs, "model."), (ex,), tie_weights=False, strict=False)

    return run


def _prepare(model: nn.Module, names: Sequence[str]) -> tuple[list[LayerSpec], Tensor]:
    specs = layer_specs(model, names)
    _check_float64(model, specs)
    return specs, flat_params(model, names)


def _keys_for(loss: LossKind, keys: Tensor | None, n: int) -> list[int | None]:
    if loss != "sampled":
        return [None] * n
    if keys is None or keys.shape != (n,):
        raise ValueError(f"loss='sampled' needs keys of shape [{n}] (one int64 key per example)")
    return [int(k) for k in keys]


# --------------------------------------------------------------------------------------------------------
# Per-example gradients
# --------------------------------------------------------------------------------------------------------


def per_example_grads(
    model: nn.Module,
    task: Any,
    data: Any,
    names: Sequence[str],
    *,
    loss: LossKind = "train",
    queries: bool = False,
    keys: Tensor | None = None,
) -> Tensor:
    """Per-example gradients [N, P] in the layout, one single-example batch at a time.

    ``loss``: ``"train"`` → ∇L(z); ``"measurement"`` → ∇f (use with ``queries=True`` for causal_lm
    prompt/completion data); ``"sampled"`` → gradient of the loss of labels drawn from the model with per-example
    int64 ``keys`` [N] (:func:`example_keys` of the engine's seed, stream and example indices).
    """
    if loss not in ("train", "measurement", "sampled"):
        raise ValueError(f"loss must be 'train', 'measurement' or 'sampled', not {loss!r}")
    specs, theta0 = _prepare(model, names)
    exs = examples(task, data, queries=queries)
    rows = []
    with torch.no_grad():  # torch.func.grad still differentiates θ; this only stops outer graphs on the params
        for ex, key in zip(exs, _keys_for(loss, keys, len(exs)), strict=True):
            run = _forward_fn(model, specs, ex)
            rows.append(grad(lambda theta, run=run, ex=ex, key=key: loss_value(ex, run(theta), loss, key))(theta0))
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


def output_hessian(
    task: Any, outputs: Tensor, ex: Example, *, method: Literal["closed_form", "autograd"] = "closed_form"
) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """The Hessian H of one example's training loss w.r.t. its outputs, restricted to the outputs it touches.

    Returns ``(sel, hmul)``: ``sel`` [K] indexes ``outputs.reshape(-1)``; ``hmul(J)`` maps J [K, P] → H[sel, sel] J.
    Closed forms: regression H = I; classification H = diag(p) − p pᵀ; causal_lm, per target position t (target
    at t+1, predicted from the logits at t), H_t = diag(p_t) − p_t p_tᵀ and zero elsewhere. ``method="autograd"``
    uses ``torch.func.hessian`` of the training loss w.r.t. the outputs.
    """
    kind = task_kind(task)
    if outputs.shape[0] != 1:
        raise ValueError("output_hessian works on single examples")
    flat = outputs.reshape(-1)
    if method == "closed_form" and kind == "regression":
        return torch.arange(flat.numel()), lambda j: j
    if method == "closed_form" and kind == "classification":
        p = torch.softmax(outputs.reshape(-1), -1)[:, None]
        return torch.arange(flat.numel()), lambda j: p * j - p * (p * j).sum(0, keepdim=True)
    if method == "closed_form" and kind == "causal_lm":
        v = outputs.shape[-1]
        pos = torch.nonzero(ex.y[0, 1:]).reshape(-1)  # predicting positions
        sel = (pos[:, None] * v + torch.arange(v)).reshape(-1)
        p = torch.softmax(outputs[0, pos], -1)[:, :, None]  # [Tt, V, 1]

        def hmul(j: Tensor) -> Tensor:
            jr = j.reshape(len(pos), v, -1)
            return (p * jr - p * (p * jr).sum(1, keepdim=True)).reshape(j.shape)

        return sel, hmul
    if method not in ("closed_form", "autograd"):
        raise ValueError(f"method must be 'closed_form' or 'autograd', not {method!r}")
    h = hessian(lambda o: loss_value(ex, o, "train"))(outputs.detach())
    h = h.reshape(flat.numel(), flat.numel())
    sel = torch.nonzero((h != 0).any(1)).reshape(-1)
    hs = h[sel][:, sel]
    return sel, lambda j: hs @ j


def dense_gnh(
    model: nn.Module,
    task: Any,
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
    exs = examples(task, data, queries=queries)
    g = theta0.new_zeros(theta0.numel(), theta0.numel())
    with torch.no_grad():
        for ex in exs:
            run = _forward_fn(model, specs, ex)
            outputs = run(theta0)
            sel, hmul = output_hessian(task, outputs, ex, method=method)
            if sel.numel() == 0:
                continue
            with warnings.catch_warnings():  # SDPA's backward has no vmap batching rule: slower, still exact
                warnings.filterwarnings("ignore", message=".*batching rule.*")
                jac = jacrev(_selected(run, sel), chunk_size=chunk_size)(theta0)  # [K, P]
            g += jac.T @ hmul(jac)
    g /= max(len(exs), 1)
    return 0.5 * (g + g.T)


def _selected(run: Callable[[Tensor], Tensor], sel: Tensor) -> Callable[[Tensor], Tensor]:
    return lambda theta: run(theta).reshape(-1)[sel]


def dense_hessian(model: nn.Module, task: Any, data: Any, names: Sequence[str]) -> Tensor:
    """Exact Hessian (1/N) Σ_n ∇²_θ L(z_n) [P, P] of the training loss (``torch.func.hessian``; small models)."""
    specs, theta0 = _prepare(model, names)
    exs = examples(task, data)
    h = theta0.new_zeros(theta0.numel(), theta0.numel())
    with torch.no_grad():
        for ex in exs:
            run = _forward_fn(model, specs, ex)
            h += hessian(lambda theta, run=run, ex=ex: loss_value(ex, run(theta), "train"))(theta0)
    return h / max(len(exs), 1)


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
# Per-token inputs and output gradients (own hooks) → Kronecker factors, token attributions
# --------------------------------------------------------------------------------------------------------


def _augmented(x: Tensor, spec: LayerSpec) -> Tensor:
    """Layer inputs [..., d_in] → ā [M, d_in (+1)] (one row per position; a column of ones for a bias)."""
    a = x.reshape(-1, spec.d_in)
    return torch.cat([a, torch.ones(len(a), 1, dtype=a.dtype)], 1) if spec.has_bias else a


def _traced(
    model: nn.Module, specs: Sequence[LayerSpec], ex: Example, perturb: Callable[[LayerSpec, Tensor], Tensor]
) -> tuple[Tensor, dict[str, list[Tensor]]]:
    """Run ``model`` on ``ex`` with a hook on every tracked module that records its input (detached) and adds
    ``perturb(spec, input)`` to its output at each use. Returns (outputs, name → inputs per use)."""
    modules = dict(model.named_modules())
    inputs: dict[str, list[Tensor]] = {s.name: [] for s in specs}
    handles = []
    for spec in specs:

        def hook(module: nn.Module, args: tuple, output: Tensor, spec: LayerSpec = spec) -> Tensor:
            inputs[spec.name].append(args[0].detach())
            return output + perturb(spec, args[0].detach())

        handles.append(modules[spec.name].register_forward_hook(hook))
    try:
        outputs = forward(model, ex)
    finally:
        for h in handles:
            h.remove()
    return outputs, inputs


def _token_io(
    model: nn.Module, specs: Sequence[LayerSpec], ex: Example, loss: LossKind, key: int | None
) -> dict[str, tuple[Tensor, Tensor]]:
    """name → (ā [M, w], g [M, d_out]) of one example, M = uses × positions: the layer's augmented input and the
    gradient of the example's loss w.r.t. the layer's output, token by token."""
    deltas: dict[str, list[Tensor]] = {s.name: [] for s in specs}

    def zero(spec: LayerSpec, x: Tensor) -> Tensor:
        d = torch.zeros(*x.shape[:-1], spec.d_out, dtype=x.dtype, requires_grad=True)
        deltas[spec.name].append(d)
        return d

    with torch.enable_grad():
        outputs, inputs = _traced(model, specs, ex, zero)
        flat = [d for s in specs for d in deltas[s.name]]
        grads = iter(torch.autograd.grad(loss_value(ex, outputs, loss, key), flat, allow_unused=True))
    out = {}
    for spec in specs:
        g = [next(grads) for _ in deltas[spec.name]]
        g = [torch.zeros_like(d) if gi is None else gi for gi, d in zip(g, deltas[spec.name], strict=True)]
        a = torch.cat([_augmented(x, spec) for x in inputs[spec.name]])
        out[spec.name] = (a, torch.cat([gi.reshape(-1, spec.d_out) for gi in g]))
    return out


def token_io(
    model: nn.Module,
    task: Any,
    data: Any,
    names: Sequence[str],
    *,
    loss: LossKind = "train",
    keys: Tensor | None = None,
) -> list[dict[str, tuple[Tensor, Tensor]]]:
    """Per example, name → (ā [M, w], g [M, d_out]) over its M = uses × real positions tokens (rows ordered by
    use, then position): the layer's augmented input and ∂(the example's loss)/∂(the layer's output)."""
    specs, _ = _prepare(model, names)
    exs = examples(task, data)
    return [
        _token_io(model, specs, ex, loss, key) for ex, key in zip(exs, _keys_for(loss, keys, len(exs)), strict=True)
    ]


@dataclass(frozen=True)
class KronFactors:
    """One layer's K-FAC factors: A = mean over tokens of ā āᵀ [w, w], S = mean over tokens of g gᵀ
    [d_out, d_out], ``tokens`` the (use, position) pairs counted, ``sequences`` the examples."""

    a: Tensor
    s: Tensor
    tokens: int
    sequences: int

    @property
    def tokens_per_sequence(self) -> float:
        """T̄ = tokens / sequences."""
        return self.tokens / self.sequences


def kronecker_factors(
    model: nn.Module,
    task: Any,
    data: Any,
    names: Sequence[str],
    *,
    loss: LossKind = "train",
    keys: Tensor | None = None,
) -> dict[str, KronFactors]:
    """name → :class:`KronFactors` over every real token of every example (DESIGN.md §1): g from the training
    loss (``"train"``, the empirical Fisher) or from labels sampled from the model (``"sampled"`` with ``keys``)."""
    sums: dict[str, list[Any]] = {name: [0.0, 0.0, 0] for name in names}
    per_example = token_io(model, task, data, names, loss=loss, keys=keys)
    for io in per_example:
        for name, (a, g) in io.items():
            acc = sums[name]
            acc[0] = acc[0] + a.T @ a
            acc[1] = acc[1] + g.T @ g
            acc[2] += len(a)
    return {name: KronFactors(a / t, s / t, t, len(per_example)) for name, (a, s, t) in sums.items()}


def token_influence(
    model: nn.Module, task: Any, data: Any, names: Sequence[str], precond: Sequence[Tensor]
) -> list[Tensor]:
    """Per example the layer × position matrix [L, T] of I_{l,t} = ⟨P_l, g_{l,t} ā_{l,t}ᵀ⟩ (paper Eq. 31), summed
    over the uses of a module at position t; ``precond`` holds P_l [d_out, w] per layer (P_l = −(G_l + λ_l)⁻¹ ∇_l f).

    Computed as a derivative, without forming g or ā: the layer's output at position t gets ε_{l,t} (P_l ā_t)
    added, so ∂L/∂ε_{l,t} at ε = 0 is g_tᵀ P_l ā_t. Position t is the t-th real token of the sequence (the token
    whose representation the layer processes there; it helps predict token t + 1).
    """
    specs, _ = _prepare(model, names)
    if len(precond) != len(specs):
        raise ValueError(f"precond has {len(precond)} matrices for {len(specs)} layers")
    mats = {s.name: p for s, p in zip(specs, precond, strict=True)}
    rows = []
    for ex in examples(task, data):
        eps = {s.name: torch.zeros(ex.positions, dtype=torch.float64, requires_grad=True) for s in specs}

        def directional(spec: LayerSpec, x: Tensor, eps: dict[str, Tensor] = eps) -> Tensor:
            p = mats[spec.name]
            delta = x @ p[:, : spec.d_in].T + (p[:, spec.d_in] if spec.has_bias else 0.0)  # P ā per position
            return eps[spec.name][:, None] * delta  # [T, 1] against [1, T, d_out] (or [1, 1] against [1, d_out])

        with torch.enable_grad():
            outputs, _ = _traced(model, specs, ex, directional)
            grads = torch.autograd.grad(
                loss_value(ex, outputs, "train"), [eps[s.name] for s in specs], allow_unused=True
            )
        rows.append(torch.stack([torch.zeros(ex.positions, dtype=torch.float64) if g is None else g for g in grads]))
    return rows


# --------------------------------------------------------------------------------------------------------
# Each strategy's block-diagonal curvature, from the definitions
# --------------------------------------------------------------------------------------------------------


def strategy_curvature(
    model: nn.Module,
    task: Any,
    data: Any,
    names: Sequence[str],
    strategy: str,
    *,
    damping_factor: float = 0.1,
) -> list[Tensor]:
    """The damped per-layer curvature (G_l + λ_l I) [P_l, P_l] of a strategy on the empirical Fisher (the data's
    labels), built only from this module's per-example gradients and factors (DESIGN.md §1):

    - identity: I (no curvature, no damping);
    - diagonal: diag(Λ), Λ = (1/N) Σ_n Ĝ_n⊙²;
    - kfac: T̄ · S ⊗ A (whose eigenvalues are T̄ λ_S ⊗ λ_A);
    - ekfac: K diag(Λ) Kᵀ, K = Q_S ⊗ Q_A from ``eigh`` of A and S here, Λ = (1/N) Σ_n (Q_Sᵀ Ĝ_n Q_A)⊙²;

    and λ_l = ``damping_factor`` × mean(Λ_l) (the mean eigenvalue: tr/P_l). The EK-FAC matrix does not depend on
    the choice of eigenvectors inside an eigenvalue-0 eigenspace (Λ vanishes there); it assumes A and S have no
    other repeated eigenvalues, which holds for random tiny models.
    """
    if strategy not in ("identity", "diagonal", "kfac", "ekfac"):
        raise ValueError(f"unknown strategy {strategy!r}")
    shapes = layer_matrix_shapes(model, names)
    if strategy == "identity":
        return [torch.eye(a * b, dtype=torch.float64) for a, b in shapes]
    grads = split_by_layer(per_example_grads(model, task, data, names), shapes)  # [N, d_out, w] per layer
    factors = kronecker_factors(model, task, data, names) if strategy in ("kfac", "ekfac") else {}
    out = []
    for name, g in zip(names, grads, strict=True):
        if strategy == "diagonal":
            curv = torch.diag(g.pow(2).mean(0).reshape(-1))
        elif strategy == "kfac":
            f = factors[name]
            curv = f.tokens_per_sequence * torch.kron(f.s, f.a)
        else:
            f = factors[name]
            q_s, q_a = torch.linalg.eigh(f.s)[1], torch.linalg.eigh(f.a)[1]
            curv = ekfac_inverse(q_s, q_a, ekfac_reference(g, q_s, q_a), None)
        lam = damping_factor * float(torch.diagonal(curv).mean())
        out.append(curv + lam * torch.eye(len(curv), dtype=curv.dtype))
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
    task: Any,
    queries: Any,
    train: Any,
    names: Sequence[str],
    *,
    damping: Damping,
    curvature: Tensor | None = None,
) -> Tensor:
    """I(q, z) = −∇f_qᵀ (G + λI)⁻¹ ∇L(z) → [Q, N].

    ∇f_q: gradient of the measurement on ``queries`` (``queries=True`` examples); ∇L(z): of the training loss.
    ``curvature`` [P, P] (default: :func:`dense_gnh` of ``train``; pass ``block_diagonal(G, shapes)`` to compare
    with the block-diagonal engine). ``damping``: float, dict name → float (per layer block), or None.
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


def ekfac_inverse(q_s: Tensor, q_a: Tensor, lam: Tensor, damping: float | None) -> Tensor:
    """Dense (K diag(Λ) Kᵀ + λI)⁻¹ = K diag(1/(Λ + λ)) Kᵀ [P_l, P_l] for orthogonal Q_S, Q_A; with ``damping``
    None, the undamped K diag(Λ) Kᵀ itself."""
    k = kron_basis(q_s, q_a)
    if damping is None:
        return (k * lam.reshape(-1)) @ k.T
    return (k / (lam.reshape(-1) + damping)) @ k.T
