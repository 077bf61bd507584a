"""Counter-based random numbers: deterministic per (seed, stream, example, position).

The true Fisher needs labels sampled from the model. Drawing them from a stateful generator would make the
fitted curvature depend on batch size, padding and data sharding. Here every random number is a pure function
of (seed, stream, example index, position), so any batching of the same examples draws the same labels.
"""

from __future__ import annotations

import torch

_GOLDEN = -7046029254386353131  # 0x9E3779B97F4A7C15 as a signed int64
_M1 = -4658895280553007687  # 0xBF58476D1CE4E5B9
_M2 = -7723592293110705685  # 0x94D049BB133111EB


def _lshr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64 finaliser on int64 tensors (wrapping arithmetic)."""
    x = x ^ _lshr(x, 30)
    x = x * _M1
    x = x ^ _lshr(x, 27)
    x = x * _M2
    return x ^ _lshr(x, 31)


def example_keys(seed: int, stream: int, indices: torch.Tensor) -> torch.Tensor:
    """Per-example int64 keys [B] from a seed, a stream id (which pass) and global example indices [B]."""
    base = _mix(torch.tensor(seed, dtype=torch.int64) * _GOLDEN + stream)
    return _mix(base + indices.to(torch.int64).cpu() * _GOLDEN)


def uniform(keys: torch.Tensor, width: int, *, salt: int = 0) -> torch.Tensor:
    """Uniform numbers in (0, 1), float64 [B, width]; column j depends only on (key, j, salt)."""
    pos = torch.arange(width, dtype=torch.int64)
    x = _mix(keys[:, None] + (pos[None, :] + 1 + salt * 1_000_003) * _GOLDEN)
    bits = _lshr(x, 11)  # 53 random bits
    return (bits.to(torch.float64) + 0.5) / float(1 << 53)


def normal(keys: torch.Tensor, width: int) -> torch.Tensor:
    """Standard normal numbers, float64 [B, width] (Box-Muller on two independent uniform streams)."""
    u1 = uniform(keys, width, salt=1)
    u2 = uniform(keys, width, salt=2)
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * torch.pi * u2)


def categorical(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw from probs [..., C] with uniforms u [...] in (0, 1); returns int64 [...]."""
    cdf = probs.cumsum(-1)
    target = (u.to(cdf.dtype) * cdf[..., -1]).unsqueeze(-1).contiguous()
    idx = torch.searchsorted(cdf.contiguous(), target).squeeze(-1)
    return idx.clamp_max(probs.shape[-1] - 1)
