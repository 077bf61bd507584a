"""The fitted curvature: per-layer factors, damping, the damped inverse, and save/load.

For a layer with gradient matrix V [d_out, w]:

- ``identity``:  (G + λ)⁻¹ V := V (no curvature, no damping: gradient dot products);
- ``diagonal``:  V ⊘ (Λ + λ), Λ the diagonal of the per-sequence Fisher in the standard basis;
- ``kfac`` / ``ekfac``: Q_S [(Q_Sᵀ V Q_A) ⊘ (Λ + λ)] Q_Aᵀ with Q_A, Q_S the eigenbases of A and S
  (block-diagonal when ``blocks`` > 1) and Λ the eigenvalues (K-FAC: T̄·λ_S⊗λ_A; EK-FAC: fitted).
"""

from __future__ import annotations

import math
import os
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from influencer.curvature.fingerprint import model_fingerprint
from influencer.curvature.linalg import (
    from_eigenbasis,
    per_example_grads,
    rotate,
    rotate_tokens_first,
    to_eigenbasis,
)
from influencer.curvature.strategies import TABLE
from influencer.curvature.strategies import strategy as strategy_record
from influencer.io import (
    CorruptArtifactError,
    atomic_save_tensors,
    atomic_write_json,
    load_tensors,
    read_json,
    tensors_metadata,
)
from influencer.layers import Layer, as_layer

STRATEGIES = tuple(TABLE)
FISHERS = ("true", "empirical")
FORMAT_VERSION = 2
"""2: the manifest is sealed and records the factors' checksum (1 is read without either)."""
_FACTORS = "factors.safetensors"
_MANIFEST = "manifest.json"


class CurvatureMismatchError(ValueError):
    """Factors do not belong to the model they are used with."""


@runtime_checkable
class Inverse(Protocol):
    """A damped inverse (G + λ)⁻¹ on per-layer gradient matrices: what the query side takes.

    Implemented by :class:`Curvature` (block-diagonal: the paper's estimator) and by
    :class:`influencer.refine.RefinedInverse` (iterative solve on the full damped Gauss-Newton matrix,
    preconditioned by a curvature). ``curvature`` is the block-diagonal estimate it rests on (tracked layers,
    damping, N for per-copy units); ``describe()`` says what it is, as JSON, for the records of every store
    and scan built on it.
    """

    @property
    def curvature(self) -> Curvature: ...

    def solve(self, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """x = (G + λ)⁻¹ v for v = ``grads`` (name → [Q, d_out, w], every tracked layer): the same shapes."""
        ...

    def describe(self) -> dict[str, Any]: ...


@dataclass
class LayerFactors:
    """Fitted factors of one layer. Shapes: qa blocks [w_b, w_b], qs blocks [o_b, o_b], lam [d_out, w]."""

    name: str
    kind: str
    d_out: int
    d_in: int
    bias: bool
    tokens: int = 0
    qa: list[torch.Tensor] | None = None
    qs: list[torch.Tensor] | None = None
    lam: torch.Tensor | None = None
    damping: float = 0.0
    eig_a: torch.Tensor | None = None  # eigenvalues of A (mean over tokens), concatenated over blocks
    eig_s: torch.Tensor | None = None  # eigenvalues of S

    @property
    def shape(self) -> tuple[int, int]:
        return (self.d_out, self.d_in + int(self.bias))

    def tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for key, blocks in (("qa", self.qa), ("qs", self.qs)):
            for i, q in enumerate(blocks or []):
                out[f"{self.name}/{key}.{i}"] = q
        for key in ("lam", "eig_a", "eig_s"):
            value = getattr(self, key)
            if value is not None:
                out[f"{self.name}/{key}"] = value
        return out

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def basis_nbytes(self) -> int:
        """Memory of the eigenbases Q_A, Q_S (what ``blocks`` divides)."""
        return sum(q.numel() * q.element_size() for q in (self.qa or []) + (self.qs or []))


@dataclass
class Curvature:
    """Block-diagonal (per layer) damped curvature (G + λI) of the tracked layers.

    Attributes: ``strategy`` (identity/diagonal/kfac/ekfac), ``fisher`` (true/empirical), ``blocks``,
    ``n_fit`` (sequences the factors were fitted on), ``n_train`` (training-set size N used for per-copy units;
    defaults to n_fit, set it to the model's real training-set size), ``damping`` (None = factor × mean(Λ) per
    layer, or one absolute value), ``damping_factor``, ``layers`` (name → LayerFactors), ``fingerprint``,
    ``seed``, ``precision`` (of the per-sequence Λ pass: "float32", or "bfloat16" — see :func:`fit_curvature`).
    """

    strategy: str
    fisher: str
    blocks: int
    n_fit: int
    n_train: int
    damping: float | None
    damping_factor: float
    layers: dict[str, LayerFactors]
    fingerprint: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    precision: str = "float32"

    # --- math ------------------------------------------------------------------------------------------
    def inverse_diagonal(self, name: str, dtype: torch.dtype, device: torch.device | None = None) -> torch.Tensor:
        """1 / (Λ + λ) for one layer, computed in float64 and cast to ``dtype``: [d_out, w]."""
        f = self.layers[name]
        if f.lam is None:
            raise ValueError(
                f"layer '{name}' has eigenbases but no eigenvalues Λ yet (the first stage of an EK-FAC "
                "fit by partitions): run fit_partition(..., basis=this) over the data and merge_fit "
                "the results to finish it"
            )
        inv = 1.0 / (f.lam.to(torch.float64) + f.damping)
        return inv.to(device=device or f.lam.device, dtype=dtype)

    def eigenbases(self, name: str, dtype: torch.dtype, device: torch.device) -> tuple[list, list]:
        """(Q_S blocks, Q_A blocks) of layer ``name`` in ``dtype`` on ``device``."""
        f = self.layers[name]
        assert f.qs is not None and f.qa is not None
        qs = [q.to(device=device, dtype=dtype) for q in f.qs]
        qa = [q.to(device=device, dtype=dtype) for q in f.qa]
        return qs, qa

    def precondition(self, name: str, v: torch.Tensor) -> torch.Tensor:
        """(G_l + λ_l)⁻¹ V for V [..., d_out, w] of layer ``name`` (identity: V itself)."""
        kind = strategy_record(self.strategy)
        if not kind.curved:
            return v
        inv = self.inverse_diagonal(name, v.dtype, v.device)
        if not kind.basis:
            return v * inv
        qs, qa = self.eigenbases(name, v.dtype, v.device)
        return from_eigenbasis(to_eigenbasis(v, qs, qa) * inv, qs, qa)

    # --- the Inverse protocol ---------------------------------------------------------------------------
    @property
    def curvature(self) -> Curvature:
        """Itself: a curvature is the block-diagonal inverse it describes."""
        return self

    def solve(self, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """(G_l + λ_l)⁻¹ V_l for every layer of ``grads`` (name → [..., d_out, w])."""
        return {name: self.precondition(name, v) for name, v in grads.items()}

    def describe(self) -> dict[str, Any]:
        """What this inverse is, as JSON (see :class:`Inverse`)."""
        return {"inverse": "curvature", "strategy": self.strategy, "steps": 0}

    def quadratic_form(self, name: str, g: torch.Tensor) -> torch.Tensor:
        """⟨G, (G_l + λ_l)⁻¹ G⟩ for G [B, d_out, w] → [B]."""
        kind = strategy_record(self.strategy)
        if not kind.curved:
            return g.pow(2).flatten(1).sum(1)
        inv = self.inverse_diagonal(name, g.dtype, g.device)
        if kind.basis:
            qs, qa = self.eigenbases(name, g.dtype, g.device)
            g = to_eigenbasis(g, qs, qa)
        return (g.pow(2) * inv).flatten(1).sum(1)

    def quadratic_form_tokens(self, name: str, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """⟨Ĝ, (G_l + λ_l)⁻¹ Ĝ⟩ of the per-sequence gradients Ĝ_b = Σ_t g_{b,t} ā_{b,t}ᵀ from a [B, T, w] and
        g [B, T, d_out] → [B], rotating tokens first (Q_Sᵀ g_t, Q_Aᵀ ā_t) when that is cheaper than rotating Ĝ."""
        if strategy_record(self.strategy).basis and rotate_tokens_first(a.shape[1], g.shape[-1], a.shape[-1]):
            qs, qa = self.eigenbases(name, a.dtype, a.device)
            rotated = per_example_grads(rotate(a, qa), rotate(g, qs))  # Q_Sᵀ Ĝ Q_A
            inv = self.inverse_diagonal(name, a.dtype, a.device)
            return (rotated.pow(2) * inv).flatten(1).sum(1)
        return self.quadratic_form(name, per_example_grads(a, g))

    def with_damping(self, damping: float | None = None, damping_factor: float | None = None) -> Curvature:
        """A copy with new damping (factors shared, nothing refitted)."""
        factor = self.damping_factor if damping_factor is None else damping_factor
        layers = {
            n: replace(f, damping=resolve_damping(self.strategy, f.lam, damping, factor))
            for n, f in self.layers.items()
        }
        return replace(self, damping=damping, damping_factor=factor, layers=layers)

    def to(self, device: torch.device | str) -> Curvature:
        def mv(blocks):
            return None if blocks is None else [q.to(device) for q in blocks]

        def mv1(t):
            return None if t is None else t.to(device)

        layers = {
            n: replace(f, qa=mv(f.qa), qs=mv(f.qs), lam=mv1(f.lam), eig_a=mv1(f.eig_a), eig_s=mv1(f.eig_s))
            for n, f in self.layers.items()
        }
        return replace(self, layers=layers)

    def nbytes(self) -> int:
        """Memory held by the factors in bytes."""
        return sum(f.nbytes() for f in self.layers.values())

    @property
    def layer_names(self) -> list[str]:
        return list(self.layers)

    @property
    def complete(self) -> bool:
        """False for the eigenbases-only result of the first stage of an EK-FAC fit by partitions."""
        return not strategy_record(self.strategy).curved or all(f.lam is not None for f in self.layers.values())

    # --- model binding -------------------------------------------------------------------------------
    def bind(self, model: nn.Module, *, check_weights: bool = True) -> list[Layer]:
        """The model's modules for the tracked layers; CurvatureMismatchError if the model differs."""
        modules = dict(model.named_modules())
        bound = []
        for name, f in self.layers.items():
            module = modules.get(name)
            layer = as_layer(name, module) if module is not None else None
            if layer is None:
                raise CurvatureMismatchError(
                    f"these factors track layer '{name}', which this model does not have (or is not a linear "
                    "layer): they were fitted on a different model; refit with fit_curvature on this model"
                )
            if (layer.d_out, layer.d_in, layer.bias) != (f.d_out, f.d_in, f.bias):
                raise CurvatureMismatchError(
                    f"layer '{name}' is [{layer.d_out}x{layer.d_in}, bias={layer.bias}] in this model but "
                    f"[{f.d_out}x{f.d_in}, bias={f.bias}] in the factors: they were fitted on a different model"
                )
            bound.append(layer)
        if check_weights and self.fingerprint.get("digest"):
            digest = model_fingerprint(bound)["digest"]
            if digest != self.fingerprint["digest"]:
                raise CurvatureMismatchError(
                    "the model's weights differ from those the factors were fitted on (same layer shapes, "
                    "different values): refit with fit_curvature on this model"
                )
        return bound

    # --- persistence ---------------------------------------------------------------------------------
    def manifest(self) -> dict[str, Any]:
        return {
            "format": "influencer.curvature",
            "version": FORMAT_VERSION,
            "strategy": self.strategy,
            "fisher": self.fisher,
            "blocks": self.blocks,
            "n_fit": self.n_fit,
            "n_train": self.n_train,
            "damping": self.damping,
            "damping_factor": self.damping_factor,
            "seed": self.seed,
            "precision": self.precision,
            "fingerprint": self.fingerprint,
            "layer_order": list(self.layers),
            "layers": {
                n: {
                    "kind": f.kind,
                    "d_out": f.d_out,
                    "d_in": f.d_in,
                    "bias": f.bias,
                    "tokens": f.tokens,
                    "mean_tokens_per_sequence": f.tokens / max(1, self.n_fit),
                    "damping": f.damping,
                    "qa_blocks": len(f.qa or []),
                    "qs_blocks": len(f.qs or []),
                    "has_lam": f.lam is not None,
                }
                for n, f in self.layers.items()
            },
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``factors.safetensors`` and ``manifest.json`` into directory ``path`` (each atomically)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        token = uuid.uuid4().hex
        tensors: dict[str, torch.Tensor] = {}
        for f in self.layers.values():
            tensors.update(f.tensors())
        digest = atomic_save_tensors(path / _FACTORS, tensors, metadata={"save_token": token})
        manifest = self.manifest()
        manifest.update(save_token=token, tensors_sha256=digest)
        atomic_write_json(path / _MANIFEST, manifest, seal=True)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, model: nn.Module | None = None) -> Curvature:
        """Read factors saved by :meth:`save`; with ``model``, check they belong to it (else a clear error)."""
        path = Path(path)
        if not (path / _MANIFEST).is_file() or not (path / _FACTORS).is_file():
            raise FileNotFoundError(
                f"no curvature at '{path}' (expected {_MANIFEST} and {_FACTORS}); "
                "create one with fit_curvature(...).save(path)"
            )
        m = read_json(path / _MANIFEST, sealed=True, legacy_below=2)
        if m.get("format") != "influencer.curvature":
            raise ValueError(f"'{path / _MANIFEST}' is not an influencer curvature manifest")
        if m.get("version", 0) > FORMAT_VERSION:
            raise ValueError(
                f"curvature at '{path}' has format version {m['version']}; this influencer reads "
                f"≤ {FORMAT_VERSION}: upgrade influencer"
            )
        if tensors_metadata(path / _FACTORS).get("save_token") != m.get("save_token"):
            raise ValueError(
                f"'{path}' holds factors and a manifest from different saves (interrupted write?); save again"
            )
        tensors = load_tensors(path / _FACTORS, expect=m.get("tensors_sha256"), required=m.get("version", 0) >= 2)
        try:
            curv = cls._from_manifest(m, tensors)
        except KeyError as e:
            raise CorruptArtifactError(f"'{path / _MANIFEST}' lacks the entry {e}: it is damaged; fit again") from None
        bad = [n for n, f in curv.layers.items() if not (math.isfinite(f.damping) and f.damping >= 0)]
        if bad:
            raise CorruptArtifactError(
                f"'{path / _MANIFEST}' gives layer '{bad[0]}' a damping that is not finite and ≥ 0"
            )
        if model is not None:
            curv.bind(model)
        return curv

    @classmethod
    def _from_manifest(cls, m: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Curvature:
        layers = {}
        for name in m.get("layer_order", list(m["layers"])):
            info = m["layers"][name]
            layers[name] = LayerFactors(
                name=name,
                kind=info["kind"],
                d_out=info["d_out"],
                d_in=info["d_in"],
                bias=info["bias"],
                tokens=info["tokens"],
                damping=float(info["damping"]),
                qa=[tensors[f"{name}/qa.{i}"] for i in range(info["qa_blocks"])] or None,
                qs=[tensors[f"{name}/qs.{i}"] for i in range(info["qs_blocks"])] or None,
                lam=tensors.get(f"{name}/lam"),
                eig_a=tensors.get(f"{name}/eig_a"),
                eig_s=tensors.get(f"{name}/eig_s"),
            )
        curv = cls(
            strategy=m["strategy"],
            fisher=m["fisher"],
            blocks=m["blocks"],
            n_fit=m["n_fit"],
            n_train=m["n_train"],
            damping=m["damping"],
            damping_factor=m["damping_factor"],
            layers=layers,
            fingerprint=m["fingerprint"],
            seed=m.get("seed", 0),
            precision=m.get("precision", "float32"),
        )
        return curv


def resolve_damping(strategy: str, lam: torch.Tensor | None, damping: float | None, factor: float) -> float:
    """λ_l: the absolute ``damping`` if given, else ``factor`` × mean(Λ_l); 0 for identity."""
    if not strategy_record(strategy).curved:
        return 0.0
    if damping is not None:
        if not (math.isfinite(damping) and damping >= 0):
            raise ValueError(f"damping must be finite and ≥ 0, got {damping}")
        return float(damping)
    if not (math.isfinite(factor) and factor > 0):
        raise ValueError(f"damping_factor must be finite and > 0, got {factor}")
    assert lam is not None
    value = factor * float(lam.to(torch.float64).mean())
    return value if value > 0 else 1e-12
