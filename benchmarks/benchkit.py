"""What the speed benchmarks (``bench_fit.py``, ``bench_scan.py``) share: the setups' models and data, the floor
pass they are measured against, stage timers, and the environment block and ``RESULTS.md`` writer of the report.

The scripts import it as a sibling module (``python benchmarks/bench_fit.py`` puts ``benchmarks/`` on the path).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import subprocess
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

import influencer
from influencer.passes import batches, eval_mode
from influencer.tasks import CausalLM

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
SEED = 0

# ------------------------------------------------------------------------------------------------ setups


@dataclass
class Setup:
    """A model, its training rows (``input_ids``/``attention_mask``, [n, T]) and the batch size to time them at."""

    name: str
    description: str
    model: nn.Module
    task: CausalLM
    train: dict[str, torch.Tensor]
    batch_size: int
    layers: str = "mlp"
    notes: list[str] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.train["input_ids"].shape)  # type: ignore[return-value]


def full_rows(ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Training rows without padding: ids [n, T] and an all-ones attention mask."""
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def subset(train: dict[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
    """The first ``n`` rows."""
    return {k: v[:n] for k, v in train.items()}


def tiny_llama(vocab: int, max_positions: int) -> tuple[nn.Module, str]:
    """The random-init float32 Llama of the ``tiny`` setups (4 layers, hidden 256, MLP 1024, 4 heads), seeded."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=max(128, max_positions),
    )
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    n_params = sum(p.numel() for p in model.parameters())
    desc = (
        f"tiny Llama (random init, fp32): 4 layers, hidden 256, MLP 1024, 4 heads, vocab {vocab}, "
        f"untied head, {n_params / 1e6:.1f} M params, attention={model.config._attn_implementation}; "
        "uniform random token ids"
    )
    return model, desc


def random_rows(vocab: int, n: int, length: int, seed: int = SEED) -> torch.Tensor:
    """Uniform random token ids [n, length] from a seeded generator."""
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


def smollm2_packed(n: int, length: int, batch_size: int) -> tuple[Any, Setup]:
    """SmolLM2-135M-Instruct (float32) and ``n`` rows of ``length`` tokens of KJV verses packed end to end.

    Returns (tokenizer, setup named ``smollm2``).
    """
    from influencer.data import kjv_verses
    from influencer.models import load_model

    model, tokenizer = load_model("smollm2-135m", dtype=torch.float32)
    need = n * length
    ids: list[int] = []
    start = 0
    while len(ids) < need:  # pack whole verses end to end (separated by a space) into fixed-length rows
        verses = kjv_verses(max(64, 2 * (need - len(ids)) // 30), start=start)
        if not verses:
            raise RuntimeError(f"the KJV has fewer than {need} tokens")
        start += len(verses)
        ids.extend(tokenizer(" ".join(v["text"] for v in verses), add_special_tokens=False)["input_ids"])
        ids.extend(tokenizer(" ", add_special_tokens=False)["input_ids"])
    rows = torch.tensor(ids[:need], dtype=torch.long).view(n, length)
    n_params = sum(p.numel() for p in model.parameters())
    desc = (
        f"SmolLM2-135M-Instruct (built-in, de-quantized fp32): 30 layers, hidden 576, MLP 1536, vocab "
        f"{model.config.vocab_size}, tied head, {n_params / 1e6:.1f} M params, "
        f"attention={model.config._attn_implementation}; KJV verses packed into {length}-token rows"
    )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return tokenizer, Setup("smollm2", desc, model, CausalLM(pad_token_id=pad), full_rows(rows), batch_size)


# ------------------------------------------------------------------------------------------------ timers


class Span(NamedTuple):
    """Elapsed wall-clock and process CPU seconds. With one thread, CPU time leaves out the time this process
    waited for a core while other processes ran, so it is the steadier measure on a shared machine."""

    wall: float
    cpu: float

    @staticmethod
    def start() -> Span:
        return Span(time.perf_counter(), time.process_time())

    def since(self) -> Span:
        return Span(time.perf_counter() - self.wall, time.process_time() - self.cpu)

    def __sub__(self, other: object) -> Span:
        assert isinstance(other, Span)
        return Span(self.wall - other.wall, self.cpu - other.cpu)


class Timers:
    """Accumulated wall and CPU seconds per named stage (CPU ops run synchronously on one thread)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def span(self, name: str) -> Span:
        return Span(self.seconds[name], self.cpu[name])

    @contextlib.contextmanager
    def time(self, name: str) -> Iterator[None]:
        t0 = Span.start()
        try:
            yield
        finally:
            dt = t0.since()
            self.seconds[name] += dt.wall
            self.cpu[name] += dt.cpu
            self.calls[name] += 1

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed_call(*args: Any, **kwargs: Any) -> Any:
            with self.time(name):
                return fn(*args, **kwargs)

        return timed_call

    def wrap_iter(self, name: str, fn: Callable[..., Iterator[Any]]) -> Callable[..., Iterator[Any]]:
        """Time the ``next()`` calls of the generator ``fn`` returns (the data pipeline)."""

        def timed_iter(*args: Any, **kwargs: Any) -> Iterator[Any]:
            it = iter(fn(*args, **kwargs))
            while True:
                with self.time(name):
                    try:
                        item = next(it)
                    except StopIteration:
                        return
                yield item

        return timed_iter


_ABSENT = object()


@contextlib.contextmanager
def patched(patches: list[tuple[Any, str, Callable[[Any], Any]]]) -> Iterator[list[str]]:
    """Replace ``obj.attr`` by ``make(original)`` for each patch that exists; restore on exit.

    Yields the names of the patches whose attribute does not exist (so a report can say what was not timed).
    """
    saved, missing = [], []
    try:
        for obj, attr, make in patches:
            if not hasattr(obj, attr):
                missing.append(f"{getattr(obj, '__name__', type(obj).__name__)}.{attr}")
                continue
            saved.append((obj, attr, obj.__dict__.get(attr, _ABSENT)))
            setattr(obj, attr, make(getattr(obj, attr)))
        yield missing
    finally:
        for obj, attr, own in reversed(saved):
            if own is _ABSENT:
                delattr(obj, attr)
            else:
                setattr(obj, attr, own)


def with_rest(total: float, stages: dict[str, float], rest: str) -> dict[str, float]:
    """``stages`` plus ``rest`` = total − Σ stages and ``total``."""
    out = dict(stages)
    out[rest] = total - sum(stages.values())
    out["total"] = total
    return out


# ------------------------------------------------------------------------------------------------ floor


def floor_pass(setup: Setup, train: dict[str, torch.Tensor], timers: Timers | None = None) -> None:
    """The floor: forward + ``loss.backward()`` of the summed next-token NLL, parameter grads reset before each
    batch as ``zero_grad()`` does (a training step without the optimizer)."""
    model, task = setup.model, setup.task
    t = timers or Timers()
    dataset = task.as_dataset(train)
    make_batches = batches if timers is None else timers.wrap_iter("data (collate)", batches)
    with eval_mode(model):
        for _, batch in make_batches(dataset, task, setup.batch_size, desc="floor", progress=False):
            with t.time("zero_grad"):
                model.zero_grad(set_to_none=True)
            with t.time("forward"):
                logits = model(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
                ).logits
            with t.time("loss (NLL)"):
                loss = F.cross_entropy(
                    logits[:, :-1].flatten(0, 1), batch["input_ids"][:, 1:].flatten(), reduction="sum"
                )
            with t.time("backward (param grads)"):
                loss.backward()
    model.zero_grad(set_to_none=True)


# ------------------------------------------------------------------------------------------------ report


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def engine_commit() -> str:
    """HEAD of the repository (read-only git calls), flagged when src/ has uncommitted changes."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "src"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" + uncommitted changes in src/" if dirty else "")


def load_average() -> str:
    """Other processes compete for the cores: a load above the thread count means noisier timings."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "unknown"


def environment() -> dict[str, str]:
    """The lines of a report's environment block (date, threads, versions, commit, CPU, load at start)."""
    import transformers

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "threads": f"{torch.get_num_threads()} (torch.set_num_threads)",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "influencer": f"{influencer.__version__} at {engine_commit()}",
        "python": platform.python_version(),
        "cpu": f"{cpu_model()} ({os.cpu_count()} logical CPUs)",
        "load average (1, 5, 15 min) at start": load_average(),
    }


def write_results(section: str, key: str) -> None:
    """Replace the ``<!-- key:begin -->`` … ``<!-- key:end -->`` block of RESULTS.md (append it if absent),
    atomically."""
    begin, end = f"<!-- {key}:begin -->", f"<!-- {key}:end -->"
    block = f"{begin}\n{section.rstrip()}\n{end}\n"
    text = RESULTS.read_text(encoding="utf-8") if RESULTS.exists() else "# Benchmark results\n\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        tail = rest.split(end, 1)[1].lstrip("\n")
        text = head + block + ("\n" + tail if tail else "")
    else:
        text = text.rstrip("\n") + "\n\n" + block
    tmp = RESULTS.with_name(f"{RESULTS.name}.{key}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, RESULTS)
