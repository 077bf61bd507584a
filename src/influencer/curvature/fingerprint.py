"""The fingerprint of a model's tracked layers: names, shapes and a digest of a strided sample of each weight —
how a saved curvature (or a fit partition) recognises the model it was fitted on."""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from influencer.layers import Layer


def weight_sample(layer: Layer) -> torch.Tensor:
    """A strided sample (≤ 4096 values) of a tracked weight in [d_out, d_in] orientation, rounded to bfloat16 (so
    float32/bfloat16/float64 copies of the same weights agree); the input of :func:`model_fingerprint`."""
    w = layer.module.weight.detach()
    if layer.kind == "conv1d":
        w = w.T
    flat = w.reshape(-1)
    step = max(1, flat.numel() // 4096)
    return flat[::step][:4096].to(torch.bfloat16).to(torch.float32).cpu().contiguous()


def fingerprint_from_samples(shapes: dict[str, list], samples: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The fingerprint of layers given their shapes [d_out, d_in, bias] and weight samples, in ``shapes`` order
    (lets a merge of partitions fitted on layer groups rebuild the fingerprint of a single fit)."""
    h = hashlib.sha256()
    for name, (d_out, d_in, bias) in shapes.items():
        h.update(name.encode())
        h.update(str((d_out, d_in, bias)).encode())
        h.update(samples[name].numpy().tobytes())
    return {"digest": h.hexdigest(), "layers": {n: list(v) for n, v in shapes.items()}}


def model_fingerprint(layers: list[Layer]) -> dict[str, Any]:
    """Layer names/shapes and a digest of a strided sample of each tracked weight (see :func:`weight_sample`)."""
    shapes = {x.name: [x.d_out, x.d_in, x.bias] for x in layers}
    return fingerprint_from_samples(shapes, {x.name: weight_sample(x) for x in layers})
