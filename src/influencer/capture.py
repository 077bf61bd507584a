"""The only module with autograd hooks: per-token layer inputs ā and output gradients g.

Usage::

    with Capture(layers) as cap:
        outputs = task.forward(model, batch)
    io = cap.gradients(loss_per_example.sum(), token_mask, batch_size)

``io[name].a`` is [B, T, d_in + bias] (the bias enters as a homogeneous coordinate 1) and ``io[name].g`` is
[B, T, d_out] = ∂loss/∂(layer output); masked tokens are zero in both. The per-example gradient of the layer is
Σ_t g_t ā_tᵀ. A module called several times in one forward (shared weights) has its uses concatenated along T,
so its per-example gradient is the sum over uses, as autograd's would be.

Gradients are taken with ``torch.autograd.grad`` with respect to the layer outputs only, so the backward pass
skips every parameter gradient (cheaper than ``loss.backward()``) and leaves ``.grad`` fields untouched.

:class:`WeightTangents` is the forward-mode counterpart: per-example weight tangents injected at the tracked
layers' outputs, for batched Jacobian-vector products along each example's own gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from influencer.layers import Layer


@dataclass
class LayerIO:
    """Captured per-token quantities of one layer for one batch.

    a: [B, T, width] inputs (bias column appended), zero at masked tokens.
    g: [B, T, d_out] output gradients, zero at masked tokens.
    tokens: number of unmasked (token, use) positions in the batch.
    uses: how many times the module ran in the forward (T = uses × tokens per use).
    """

    a: torch.Tensor
    g: torch.Tensor
    tokens: int
    uses: int


class Capture:
    """Context manager recording the inputs and outputs of the given layers during a forward pass."""

    def __init__(self, layers: list[Layer]):
        self.layers = layers
        # per call: (raw input — kept so its id() identifies inputs shared between layers, output)
        self._calls: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {x.name: [] for x in layers}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> Capture:
        for layer in self.layers:
            self._handles.append(layer.module.register_forward_hook(self._hook(layer.name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, name: str):
        calls = self._calls[name]

        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor):
            if not torch.is_grad_enabled():
                raise RuntimeError("influencer needs gradients: do not run the capture under torch.no_grad()")
            if not output.requires_grad:
                # Nothing upstream needs a gradient: make the output a leaf so ∂loss/∂output still flows.
                output = output.detach().requires_grad_(True)
                calls.append((inputs[0], output))
                return output
            calls.append((inputs[0], output))
            return None

        return hook

    def gradients(self, loss: torch.Tensor, mask: torch.Tensor | None, batch_size: int) -> dict[str, LayerIO]:
        """Backpropagate the scalar ``loss`` to the recorded outputs; returns per-layer ā and g.

        mask: [B, T] bool of real tokens, or None when every example is a single position.
        """
        names, outputs = [], []
        for layer in self.layers:
            calls = self._calls[layer.name]
            if not calls:
                raise RuntimeError(
                    f"layer '{layer.name}' was not called in the forward pass; remove it from the tracked layers"
                )
            for _, out in calls:
                names.append(layer.name)
                outputs.append(out)
        grads = torch.autograd.grad(loss, outputs, allow_unused=True)
        it = iter(grads)
        # a batch without padding needs no masking: skip the copies (one check per batch)
        full = mask is None or bool(mask.all())
        n_tokens = None if mask is None else int(mask.sum())  # once per batch: a host sync on GPUs
        result = {}
        # layers fed the very same input tensor (e.g. gate_proj and up_proj) share one ā tensor object, so
        # consumers can compute its covariance or rotation once (they test ``a is other.a``)
        shared_inputs: dict[tuple[int, bool], torch.Tensor] = {}
        for layer in self.layers:
            a_parts, g_parts, tokens = [], [], 0
            for x, out in self._calls[layer.name]:
                g = next(it)
                if g is None:
                    g = torch.zeros_like(out)
                a, g, m = _per_token(layer, x.detach(), g, mask, full, n_tokens, batch_size)
                a = shared_inputs.setdefault((id(x), layer.bias), a)
                a_parts.append(a)
                g_parts.append(g)
                tokens += m
            uses = len(a_parts)
            result[layer.name] = LayerIO(
                a=a_parts[0] if uses == 1 else torch.cat(a_parts, 1),
                g=g_parts[0] if uses == 1 else torch.cat(g_parts, 1),
                tokens=tokens,
                uses=uses,
            )
        self._calls = {x.name: [] for x in self.layers}
        return result


def _per_token(
    layer: Layer,
    x: torch.Tensor,
    g: torch.Tensor,
    mask: torch.Tensor | None,
    full: bool,
    n_tokens: int | None,
    batch_size: int,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Reshape one call's input/grad to [B, T, ·], apply the token mask and append the bias coordinate.

    full: the mask is None or all true (nothing to mask). n_tokens: the mask's sum (None without a mask).
    """
    if x.shape[0] != batch_size:
        raise ValueError(
            f"layer '{layer.name}' saw an input of shape {tuple(x.shape)} whose first dimension is "
            f"not the batch size {batch_size}; influencer needs batch-first layers"
        )
    a = x.reshape(batch_size, -1, layer.d_in)
    g = g.reshape(batch_size, -1, layer.d_out)
    t = a.shape[1]
    if full:
        m = None
        tokens = batch_size * t
    elif mask is not None and mask.shape[1] == t and mask.shape[0] == batch_size:
        m = mask.to(device=a.device, dtype=a.dtype).unsqueeze(-1)
        a = a * m
        g = g * m.to(g.dtype)
        assert n_tokens is not None
        tokens = n_tokens
    else:
        raise ValueError(
            f"layer '{layer.name}' sees {t} positions per example but the token mask has "
            f"{mask.shape[1]}; cannot tell padding apart"
        )
    if layer.bias:
        ones = torch.ones(batch_size, t, 1, dtype=a.dtype, device=a.device)
        a = torch.cat([a, ones if m is None else ones * m], -1)
    return a, g, tokens


class WeightTangents:
    """Forward-mode AD with a weight tangent per example: used inside ``torch.autograd.forward_ad.dual_level()``,
    each given layer's output gains the tangent ΔW_b ā_{b,t} of its example b at every position t (ΔW: name →
    [B, d_out, d_in + bias], the engine's matrix layout), on top of any tangent flowing in from earlier layers.
    The output's tangent is then J_b ΔW_b, the directional derivative of each example's outputs along its own
    weight direction — what a batched Jacobian-vector product with per-example parameters would give.
    """

    def __init__(self, layers: list[Layer], deltas: dict[str, torch.Tensor]):
        self.layers, self.deltas = layers, deltas
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> WeightTangents:
        for layer in self.layers:
            self._handles.append(layer.module.register_forward_hook(self._hook(layer)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, layer: Layer):
        import torch.autograd.forward_ad as fwad

        delta = self.deltas[layer.name]

        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
            x = fwad.unpack_dual(inputs[0]).primal
            b = delta.shape[0]
            a = x.reshape(b, -1, layer.d_in)
            if layer.bias:
                a = torch.cat([a, torch.ones_like(a[..., :1])], -1)
            extra = torch.einsum("bow,btw->bto", delta.to(a.dtype), a).reshape(output.shape)
            return output + fwad.make_dual(torch.zeros_like(extra), extra)

        return hook
