"""Tiny deterministic test models and data (seeded; float64 by default).

Every builder draws its initial weights under its own seed inside ``torch.random.fork_rng`` so building a model
never disturbs the global RNG stream of the calling test, and the same arguments always give the same weights.
Models are returned in ``eval()`` mode (no dropout anywhere).

Layer names to pass to the references / engine:

- :func:`mlp`: ``"0"``, ``"2"``, ``"4"``, … (``nn.Sequential`` indices of the Linear layers).
- :func:`tiny_llama`: ``"model.layers.{i}.mlp.{gate,up,down}_proj"``, ``"model.layers.{i}.self_attn.{q,k,v,o}_proj"``,
  ``"lm_head"`` — see :func:`llama_mlp_names` and :func:`linear_names`.
- :func:`tiny_gpt2`: ``"transformer.h.{i}.mlp.c_fc"`` (Conv1D), … — see :func:`linear_names`.
- :class:`ConvLinearPair`: ``ConvLinearPair.names`` (the middle one is the Conv1D / Linear).
- :class:`SharedMLP`: ``SharedMLP.names`` = ``["fc_in", "shared", "fc_out"]``.

Float64 note: Hugging Face Llama is *not* float64-faithful out of the box — ``LlamaRMSNorm`` computes in float32
and the ``eager`` attention runs its softmax in float32 (and the backward casts through float32 too). Autograd
paths still agree with each other to ~1e-16 on such a model (same rounding everywhere), but the model function
itself is only float32-accurate: float64 finite differences (PBRF, response checks) match its gradient to ~1e-3.
:func:`tiny_llama` therefore (by default) swaps every RMSNorm for a float64 one with the same parameter name and
uses ``sdpa`` attention (torch's SDPA keeps float64); the result matches finite differences to ~1e-9. GPT-2's eager
attention and ``nn.LayerNorm`` are float64-clean as they are.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.pytorch_utils import Conv1D

DEFAULT_DTYPE = torch.float64


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Run a block under ``torch.manual_seed(seed)`` without touching the caller's global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------------------------
# MLPs and supervised data
# --------------------------------------------------------------------------------------------------------


def mlp(
    d_in: int = 5,
    hidden: int = 8,
    d_out: int = 3,
    act: Callable[[], nn.Module] = nn.Tanh,
    seed: int = 0,
    *,
    depth: int = 2,
    bias: bool = True,
    dtype: torch.dtype = DEFAULT_DTYPE,
) -> nn.Sequential:
    """``Linear → act → … → Linear`` with ``depth`` hidden layers of width ``hidden`` (biases on by default).

    Linear layers sit at even indices: names ``"0"``, ``"2"``, ``"4"`` for the default ``depth=2``;
    ``depth=0`` gives a single linear layer ``"0"`` (a linear model).
    """
    sizes = [d_in, *([hidden] * depth), d_out]
    layers: list[nn.Module] = []
    with _seeded(seed):
        for i, (a, b) in enumerate(itertools.pairwise(sizes)):
            if i:
                layers.append(act())
            layers.append(nn.Linear(a, b, bias=bias))
    return nn.Sequential(*layers).to(dtype).eval()


def mlp_names(model: nn.Sequential) -> list[str]:
    """Names of the Linear layers of a :func:`mlp` in forward order."""
    return [name for name, m in model.named_children() if isinstance(m, nn.Linear)]


def regression_data(
    n: int, d_in: int = 5, d_out: int = 3, seed: int = 0, *, dtype: torch.dtype = DEFAULT_DTYPE
) -> tuple[torch.Tensor, torch.Tensor]:
    """X [n, d_in], Y [n, d_out], standard normal."""
    g = _generator(seed)
    return torch.randn(n, d_in, generator=g, dtype=dtype), torch.randn(n, d_out, generator=g, dtype=dtype)


def classification_data(
    n: int, d_in: int = 5, classes: int = 3, seed: int = 0, *, dtype: torch.dtype = DEFAULT_DTYPE
) -> tuple[torch.Tensor, torch.Tensor]:
    """X [n, d_in] standard normal, Y [n] int64 labels in [0, classes)."""
    g = _generator(seed)
    return torch.randn(n, d_in, generator=g, dtype=dtype), torch.randint(0, classes, (n,), generator=g)


def token_data(n: int, t: int = 8, vocab: int = 64, seed: int = 0) -> torch.Tensor:
    """Uniform random token ids, LongTensor [n, t]."""
    return torch.randint(0, vocab, (n, t), generator=_generator(seed))


# --------------------------------------------------------------------------------------------------------
# Hugging Face causal LMs
# --------------------------------------------------------------------------------------------------------


class RMSNorm64(nn.Module):
    """Llama RMSNorm computed in the input dtype (HF's upcasts to float32). Same parameter name ``weight``."""

    def __init__(self, weight: nn.Parameter, eps: float):
        super().__init__()
        self.weight = weight
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def _swap_rmsnorm(model: nn.Module) -> None:
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, LlamaRMSNorm):
                setattr(parent, child_name, RMSNorm64(child.weight, child.variance_epsilon))


def tiny_llama(
    vocab: int = 64,
    hidden: int = 16,
    intermediate: int = 32,
    layers: int = 2,
    heads: int = 2,
    seed: int = 0,
    *,
    kv_heads: int | None = None,
    init_std: float = 0.2,
    max_positions: int = 64,
    dtype: torch.dtype = DEFAULT_DTYPE,
    exact_float64: bool = True,
) -> LlamaForCausalLM:
    """A tiny ``LlamaForCausalLM`` (untied lm_head, no biases, eval mode).

    ``init_std`` is larger than HF's 0.02 so the logits are not all ~0 (with 0.02 the model is nearly uniform and
    curvature tests become weak). ``exact_float64=True`` (default) makes the model float64-faithful: RMSNorm in
    the model dtype and ``sdpa`` attention; ``False`` gives the stock ``eager`` model (float32 softmax + norms).
    """
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        initializer_range=init_std,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    cfg._attn_implementation = "sdpa" if exact_float64 else "eager"
    with _seeded(seed):
        model = LlamaForCausalLM(cfg)
    if exact_float64:
        _swap_rmsnorm(model)
    return model.to(dtype).eval()


def llama_mlp_names(layers: int = 2) -> list[str]:
    """The MLP Linear names of :func:`tiny_llama` in forward order (gate, up, down per block)."""
    return [f"model.layers.{i}.mlp.{p}_proj" for i in range(layers) for p in ("gate", "up", "down")]


def tiny_gpt2(
    vocab: int = 64,
    hidden: int = 16,
    layers: int = 2,
    heads: int = 2,
    seed: int = 0,
    *,
    positions: int = 32,
    init_std: float = 0.2,
    dtype: torch.dtype = DEFAULT_DTYPE,
) -> GPT2LMHeadModel:
    """A tiny ``GPT2LMHeadModel``: Conv1D attention/MLP layers with biases, untied Linear lm_head, no dropout."""
    cfg = GPT2Config(
        vocab_size=vocab,
        n_embd=hidden,
        n_layer=layers,
        n_head=heads,
        n_positions=positions,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=False,
        initializer_range=init_std,
        bos_token_id=0,
        eos_token_id=0,
    )
    cfg._attn_implementation = "eager"
    with _seeded(seed):
        model = GPT2LMHeadModel(cfg)
    return model.to(dtype).eval()


def linear_names(model: nn.Module, *, include: Callable[[str], bool] | None = None) -> list[str]:
    """Names of every ``nn.Linear`` / HF ``Conv1D`` module in registration order, optionally filtered."""
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))]
    return [n for n in names if include is None or include(n)]


# --------------------------------------------------------------------------------------------------------
# Special structure: Conv1D vs Linear, shared modules
# --------------------------------------------------------------------------------------------------------


class ConvLinearPair:
    """Two identical MLPs ``Linear(d_in, h1) → tanh → M(h1, h2) → tanh → Linear(h2, d_out)`` where ``M`` is an HF
    ``Conv1D(nf=h2, nx=h1)`` in :attr:`conv` and an ``nn.Linear(h1, h2)`` in :attr:`linear` holding the same
    numbers (``linear[2].weight == conv[2].weight.T``). The two compute the same function, so every per-layer
    quantity must agree. ``h1 != h2`` so that a transposition mistake cannot hide behind a square matrix.
    """

    names: tuple[str, ...] = ("0", "2", "4")

    def __init__(
        self,
        d_in: int = 4,
        h1: int = 6,
        h2: int = 5,
        d_out: int = 3,
        seed: int = 0,
        *,
        dtype: torch.dtype = DEFAULT_DTYPE,
    ):
        with _seeded(seed):
            first = nn.Linear(d_in, h1)
            conv = Conv1D(nf=h2, nx=h1)
            nn.init.normal_(conv.weight, std=h1**-0.5)
            nn.init.normal_(conv.bias, std=0.5)
            last = nn.Linear(h2, d_out)
        lin = nn.Linear(h1, h2)
        with torch.no_grad():
            lin.weight.copy_(conv.weight.T)
            lin.bias.copy_(conv.bias)
        self.conv = self._wrap(first, conv, last).to(dtype).eval()
        self.linear = self._wrap(_clone_linear(first), lin, _clone_linear(last)).to(dtype).eval()

    @staticmethod
    def _wrap(first: nn.Module, middle: nn.Module, last: nn.Module) -> nn.Sequential:
        return nn.Sequential(first, nn.Tanh(), middle, nn.Tanh(), last)


def _clone_linear(layer: nn.Linear) -> nn.Linear:
    out = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    out.load_state_dict(layer.state_dict())
    return out


class SharedMLP(nn.Module):
    """``x → fc_in → tanh → shared → tanh → shared → tanh → fc_out``: one ``nn.Linear(h, h)`` used twice per
    forward pass (genuinely shared weights; its gradient is the sum over both uses)."""

    names: tuple[str, ...] = ("fc_in", "shared", "fc_out")

    def __init__(
        self, d_in: int = 5, hidden: int = 6, d_out: int = 3, seed: int = 0, *, dtype: torch.dtype = DEFAULT_DTYPE
    ):
        super().__init__()
        with _seeded(seed):
            self.fc_in = nn.Linear(d_in, hidden)
            self.shared = nn.Linear(hidden, hidden)
            self.fc_out = nn.Linear(hidden, d_out)
        self.to(dtype).eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.fc_in(x))
        h = torch.tanh(self.shared(h))
        h = torch.tanh(self.shared(h))
        return self.fc_out(h)
