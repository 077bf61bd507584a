"""Which layers are tracked: linear maps found by type, chosen by preset, names or regex.

A tracked layer is an ``nn.Linear`` (subclasses included) or a Hugging Face GPT-2 ``Conv1D``. Its gradient is
always laid out as a matrix [d_out, d_in + bias]: the weight in [d_out, d_in] orientation (Conv1D's stored
[d_in, d_out] weight is transposed) with the bias gradient as the last column.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn

PRESETS = ("mlp", "attention", "all")

_MLP = re.compile(r"(^|\.)(mlp|feed_forward|ffn|experts|block_sparse_moe|fc1|fc2|fc_in|fc_out)(\.|$)")
_ATTENTION = re.compile(r"(^|\.)(self_attn|attn|attention|self_attention|cross_attention|encoder_attn)(\.|$)")
_HEAD_NAMES = re.compile(r"(^|\.)(lm_head|embed_out|output_projection)$")

LayerSpec = str | Sequence[str] | Callable[[str, nn.Module], bool] | None


@dataclass(frozen=True)
class Layer:
    """A tracked layer. ``d_in`` excludes the bias coordinate; ``width`` = d_in + bias."""

    name: str
    module: nn.Module
    kind: str  # "linear" | "conv1d"
    d_out: int
    d_in: int
    bias: bool

    @property
    def width(self) -> int:
        return self.d_in + int(self.bias)

    @property
    def shape(self) -> tuple[int, int]:
        """Gradient matrix shape [d_out, d_in + bias]."""
        return (self.d_out, self.width)


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except Exception:  # transformers not installed or broken
        return None
    return Conv1D


def as_layer(name: str, module: nn.Module) -> Layer | None:
    """Describe ``module`` as a trackable layer, or None if it is not one."""
    if isinstance(module, nn.Linear):
        return Layer(name, module, "linear", module.out_features, module.in_features, module.bias is not None)
    conv1d = _conv1d_type()
    if conv1d is not None and isinstance(module, conv1d):
        d_in, d_out = module.weight.shape
        return Layer(name, module, "conv1d", d_out, d_in, getattr(module, "bias", None) is not None)
    return None


def _output_heads(model: nn.Module) -> set[int]:
    """ids of modules that map to the vocabulary or share weights with an embedding."""
    heads: set[int] = set()
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        try:
            head = get_out()
        except Exception:
            head = None
        if head is not None:
            heads.add(id(head))
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for m in model.modules():
        w = getattr(m, "weight", None)
        if w is not None and id(w) in embedding_weights and not isinstance(m, nn.Embedding):
            heads.add(id(m))
    return heads


def candidate_layers(model: nn.Module) -> list[Layer]:
    """Every trackable layer of the model in ``named_modules`` order (each module once)."""
    seen: set[int] = set()
    out = []
    for name, module in model.named_modules():
        layer = as_layer(name, module)
        if layer is not None and id(module) not in seen:
            seen.add(id(module))
            out.append(layer)
    return out


def _describe(layers: Sequence[Layer], limit: int = 12) -> str:
    names = [f"{x.name} [{x.d_out}x{x.d_in}]" for x in layers[:limit]]
    more = f", … ({len(layers) - limit} more)" if len(layers) > limit else ""
    return ", ".join(names) + more if names else "(none: the model has no nn.Linear or Conv1D layers)"


def select_layers(model: nn.Module, spec: LayerSpec = "all") -> list[Layer]:
    """Choose tracked layers.

    ``spec``: a preset ("mlp", "attention", "all"), a list of exact module names, a regex searched in module names,
    or a predicate (name, module). Output heads and embedding-tied layers (as wide as the vocabulary) are tracked
    only by name: in the list, or spelled in the regex (``'lm_head'``), never by a preset, ``'.*'`` or a predicate.
    Raises ValueError listing the candidates when nothing matches.
    """
    candidates = candidate_layers(model)
    heads = _output_heads(model)
    body = [x for x in candidates if id(x.module) not in heads and not _HEAD_NAMES.search(x.name)]
    if spec is None:
        spec = "all"
    if isinstance(spec, str) and spec in PRESETS:
        if spec == "all":
            chosen = body
        else:
            pattern = _MLP if spec == "mlp" else _ATTENTION
            chosen = [x for x in body if pattern.search(x.name)]
        what = f"preset '{spec}'"
    elif isinstance(spec, str):
        if not spec.strip():
            raise ValueError(f"layers={spec!r} is empty (an unset variable?): name a preset {PRESETS} or a regex")
        try:
            rx = re.compile(spec)
        except re.error as e:
            raise ValueError(f"layers={spec!r} is neither a preset {PRESETS} nor a valid regex ({e})") from e
        # an output head or embedding-tied layer (vocabulary-wide: its factors can take gigabytes) is tracked only
        # when the regex spells its name, never by a broad pattern such as '.*'
        inner = {id(x.module) for x in body}
        chosen = [
            x for x in candidates if rx.search(x.name) and (id(x.module) in inner or x.name.rsplit(".", 1)[-1] in spec)
        ]
        what = f"regex {spec!r}"
    elif callable(spec):
        chosen = [x for x in body if spec(x.name, x.module)]
        what = "the layer predicate (output heads are tracked only by name)"
    else:
        names = list(spec)
        by_name = {x.name: x for x in candidates}
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise ValueError(
                f"layers {unknown} are not nn.Linear/Conv1D modules of this model; candidates: {_describe(candidates)}"
            )
        chosen = [by_name[n] for n in dict.fromkeys(names)]
        what = "the given names"
    if not chosen:
        raise ValueError(f"{what} matched no layer; candidates: {_describe(candidates)}")
    return chosen
