"""Plan a run before starting it: predicted peak memory and time per stage, and settings that fit a budget.

Memory comes from the layer shapes and the settings (exact byte counts of every factor, sum, basis and query
the engine holds) plus two measured quantities: the process's resident memory before the run (the runtime and
the model) and the activations one forward + backward of one sequence keeps for the backward pass (counted with
autograd's saved-tensor hooks on a calibration batch). Time comes from a short calibration run of each pass on
the same device (a few batches), scaled by the number of sequences, and from timing one eigendecomposition,
scaled by d³.

    p = influencer.plan.plan(model, task, layers="mlp", n_train=100_000, n_queries=64, memory_budget=16 * 2**30)
    print(p.report())          # per stage: peak memory, breakdown, time
    p.suggestions              # blocks / rank / batch size / resident queries within the budget

On the CPU memory means the process's peak resident set (RSS); on CUDA it means device memory (the CUDA context
and allocator slack excluded). The model and the runtime are counted once, in every stage.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from influencer.capture import Capture
from influencer.curvature.fit import stages_of
from influencer.curvature.linalg import split_sizes
from influencer.curvature.strategies import strategy as strategy_record
from influencer.layers import Layer, LayerSpec, select_layers
from influencer.passes import compute_dtype, eval_mode, model_device
from influencer.progress import NoBar
from influencer.scan import DEFAULT_DENSE_BUDGET, contraction_costs
from influencer.tasks import CausalLM, Task

_GIB = 2**30


def _fmt_bytes(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def _fmt_time(s: float | None) -> str:
    if s is None:
        return "-"
    if s >= 3600:
        return f"{s / 3600:.1f} h"
    if s >= 60:
        return f"{s / 60:.1f} min"
    return f"{s:.2f} s"


@dataclass
class Stage:
    """One stage of a run: predicted peak memory (with its parts) and time."""

    name: str
    parts: dict[str, int]
    seconds: float | None = None
    note: str = ""

    @property
    def memory(self) -> int:
        return sum(self.parts.values())


@dataclass
class Plan:
    """Predicted memory and time per stage of a fit + scan, and suggestions (see :func:`plan`)."""

    settings: dict[str, Any]
    stages: list[Stage]
    device: str
    memory_kind: str
    suggestions: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, float] = field(default_factory=dict)

    @property
    def peak(self) -> int:
        """The largest predicted stage memory (bytes)."""
        return max(s.memory for s in self.stages)

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(f"no stage '{name}'; stages: {[s.name for s in self.stages]}")

    @property
    def seconds(self) -> float | None:
        times = [s.seconds for s in self.stages]
        return None if any(t is None for t in times) else float(sum(times))  # type: ignore[arg-type]

    def report(self) -> str:
        """A readable table: stage, peak memory, the largest parts, time; then the suggestions."""
        lines = [
            f"plan on {self.device} ({self.memory_kind}); settings: "
            + ", ".join(f"{k}={v}" for k, v in self.settings.items())
        ]
        lines.append(f"{'stage':<12} {'peak':>11} {'time':>9}  largest parts")
        for s in self.stages:
            parts = sorted(s.parts.items(), key=lambda kv: -kv[1])[:4]
            lines.append(
                f"{s.name:<12} {_fmt_bytes(s.memory):>11} {_fmt_time(s.seconds):>9}  "
                + ", ".join(f"{k} {_fmt_bytes(v)}" for k, v in parts)
                + (f"  ({s.note})" if s.note else "")
            )
        lines.append(f"peak {_fmt_bytes(self.peak)}; total time {_fmt_time(self.seconds)}")
        for key, value in self.suggestions.items():
            lines.append(f"suggest {key}: {value}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "settings": self.settings,
            "device": self.device,
            "memory_kind": self.memory_kind,
            "peak": self.peak,
            "seconds": self.seconds,
            "suggestions": self.suggestions,
            "calibration": self.calibration,
            "stages": [
                {"name": s.name, "memory": s.memory, "parts": s.parts, "seconds": s.seconds, "note": s.note}
                for s in self.stages
            ],
        }


# --------------------------------------------------------------------------------------------------------
# Byte counts from shapes
# --------------------------------------------------------------------------------------------------------


@dataclass
class _Shapes:
    layers: list[Layer]
    shared_a: dict[str, str]  # layer → the layer whose A (and Q_A) it shares
    item: int  # bytes per element of the compute dtype

    def cov(self, blocks: int) -> int:
        """Σ over layers of the A and S block sums (A once per group of layers fed the same input)."""
        total = 0
        for x in self.layers:
            if self.shared_a.get(x.name, x.name) == x.name:
                total += sum(s * s for s in split_sizes(x.width, blocks))
            total += sum(s * s for s in split_sizes(x.d_out, blocks))
        return total * self.item

    def lam(self) -> int:
        return sum(x.d_out * x.width for x in self.layers) * self.item

    def eig(self) -> int:
        return sum(x.width + x.d_out for x in self.layers) * 8

    def largest_block(self, blocks: int) -> int:
        return max(max(split_sizes(x.width, blocks)[0], split_sizes(x.d_out, blocks)[0]) for x in self.layers)

    def store(self, n_queries: int, rank: int | None) -> tuple[int, int]:
        """(bytes of the rank-k query store, bytes if every layer were exact)."""
        low, exact = 0, 0
        for x in self.layers:
            dense = x.d_out * x.width
            exact += dense
            low += dense if rank is None or rank * (x.d_out + x.width) >= dense else rank * (x.d_out + x.width)
        return n_queries * low * self.item, n_queries * exact * self.item


def _rss() -> int:
    """This process's resident memory now (psutil if installed, else /proc, else the peak so far)."""
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        pass
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _model_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


# --------------------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------------------


def _calibration_examples(model: nn.Module, task: Task, data: Any, batch_size: int, seq_len: int) -> list[Any]:
    """``batch_size`` examples (as the task's dataset yields them): from ``data``, or random tokens for an LM."""
    if data is not None:
        dataset = task.as_dataset(data)
        n = len(dataset)  # type: ignore[arg-type]
        return [dataset[i % n] for i in range(batch_size)]
    if not isinstance(task, CausalLM):
        raise ValueError(f"plan needs data= (a few training examples) to calibrate a {task.name} task")
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is None:
        probe = task.as_dataset(torch.zeros(1, 2, dtype=torch.long))
        with torch.no_grad():
            vocab = task.forward(model, task.to(task.collate([probe[0]]), model_device(model))).shape[-1]
    g = torch.Generator().manual_seed(0)
    dataset = task.as_dataset(torch.randint(0, int(vocab), (batch_size, seq_len), generator=g))
    return [dataset[i] for i in range(batch_size)]


def _saved_activation_bytes(model: nn.Module, task: Task, layers: list[Layer], batch: Any) -> tuple[int, int, int]:
    """(bytes autograd saves for the backward of one batch (deduplicated by storage), bytes of the captured ā
    and g, bytes of the model's outputs)."""
    storages: dict[int, int] = {}
    weights = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}

    def pack(t: torch.Tensor) -> torch.Tensor:
        try:
            s = t.untyped_storage()
            if s.data_ptr() not in weights:  # weights saved for the backward are the model's, not activations
                storages[s.data_ptr()] = s.nbytes()
        except (RuntimeError, NotImplementedError):  # e.g. sparse or meta tensors
            pass
        return t

    device = model_device(model)
    batch = task.to(batch, device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), Capture(layers) as cap:
        outputs = task.forward(model, batch)
        loss = task.train_loss(outputs, batch).sum()
    io = cap.gradients(loss, task.token_mask(batch), task.batch_size_of(batch))
    captured: dict[int, int] = {}
    for x in io.values():
        for t in (x.a, x.g):
            captured[id(t)] = t.numel() * t.element_size()
    return sum(storages.values()), sum(captured.values()), outputs.numel() * 4


def _shared_inputs(model: nn.Module, task: Task, layers: list[Layer], batch: Any) -> dict[str, str]:
    from influencer.passes import layer_io

    io = layer_io(model, task, layers, batch, torch.arange(task.batch_size_of(batch)), loss="train")
    first: dict[int, str] = {}
    return {name: first.setdefault(id(x.a), name) for name, x in io.items()}


def _time(fn, repeats: int = 2) -> float:
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def _calibrate_times(
    model: nn.Module,
    task: Task,
    layers: list[Layer],
    examples: list[Any],
    shapes: _Shapes,
    blocks: int,
    rank: int | None,
    n_queries: int,
) -> dict[str, float]:
    """Seconds per sequence of each pass and seconds per d³ of an eigendecomposition, measured on a batch."""
    from influencer.curvature.core import LayerFactors
    from influencer.curvature.fit import _Fit
    from influencer.queries import LayerQueries, QueryStore
    from influencer.scan.contract import _LayerScorer
    from influencer.scan.shard import _scan_shard

    b = len(examples)
    dataset = examples
    fit = _Fit(model, task, layers, dataset, b, "sampled", 0, False, blocks)
    out: dict[str, float] = {}
    out["covariance"] = _time(lambda: fit.accumulate("covariance", 0, b)) / b
    device, dtype = model_device(model), compute_dtype(model)
    factors = {}
    for x in layers:
        f = LayerFactors(x.name, x.kind, x.d_out, x.d_in, x.bias)
        f.qa = [torch.eye(s, dtype=dtype, device=device) for s in split_sizes(x.width, blocks)]
        f.qs = [torch.eye(s, dtype=dtype, device=device) for s in split_sizes(x.d_out, blocks)]
        factors[x.name] = f
    out["eigenvalues"] = _time(lambda: fit.accumulate("eigenvalues", 0, b, bases=factors)) / b
    out["diagonal"] = _time(lambda: fit.accumulate("diagonal", 0, b)) / b
    # eigh: one decomposition of the largest block size (capped), scaled by d³
    d = min(shapes.largest_block(blocks), 768)
    m = torch.randn(d, d, dtype=torch.float64, device=device)
    m = m @ m.T
    out["eigh_per_d3"] = _time(lambda: torch.linalg.eigh(m), repeats=1) / d**3
    # scan: a random rank-k store of n_queries queries (at most 64 for the timing, scaled linearly)
    q = min(n_queries, 64)
    g = torch.Generator(device="cpu").manual_seed(0)
    store_layers = {}
    for x in layers:
        if rank is None or rank * (x.d_out + x.width) >= x.d_out * x.width:
            store_layers[x.name] = LayerQueries(
                x.name, dense=torch.randn(q, x.d_out, x.width, generator=g, dtype=dtype)
            )
        else:
            store_layers[x.name] = LayerQueries(
                x.name,
                left=torch.randn(q, x.d_out, rank, generator=g, dtype=dtype),
                right=torch.randn(q, rank, x.width, generator=g, dtype=dtype),
            )
    store = QueryStore(store_layers, rank, q)
    scorers = [_LayerScorer(x, store.layers[x.name], "tokens", dtype, device) for x in layers]
    with eval_mode(model):
        out["scan"] = (
            _time(
                lambda: _scan_shard(
                    model, task, layers, scorers, dataset, torch.arange(b), None, q, 10, dtype, b, False, NoBar()
                )
            )
            / b
            * (n_queries / q)
        )
    # per query: a measurement pass (like a training pass), the rotation of its token factors into the
    # eigenbases, the rank-k SVD there and the rotation of the factors back (influencer.eigenbasis_store)
    from influencer.curvature.linalg import from_eigenbasis, rotate
    from influencer.queries import truncated_svd

    tokens = int(examples[0]["input_ids"].shape[-1]) if isinstance(examples[0], dict) else 1

    def one_query() -> None:
        for x in layers:
            f = factors[x.name]
            a = torch.randn(1, tokens, x.width, dtype=dtype, device=device)
            g = torch.randn(1, tokens, x.d_out, dtype=dtype, device=device)
            m = rotate(g, f.qs).mT @ rotate(a, f.qa)
            if rank is not None and rank * (x.d_out + x.width) < x.d_out * x.width:
                left, right = truncated_svd(m, rank)
                rotate(left.mT, f.qs, transpose=True), rotate(right, f.qa, transpose=True)
            else:
                from_eigenbasis(m, f.qs, f.qa)

    out["queries"] = out["covariance"] + _time(one_query)
    return out


# --------------------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------------------


def plan(
    model: nn.Module,
    task: Task | None = None,
    layers: LayerSpec = None,
    *,
    strategy: str = "ekfac",
    blocks: int = 1,
    rank: int | None = 32,
    n_queries: int = 16,
    batch_size: int = 8,
    seq_len: int = 512,
    n_train: int = 10_000,
    top_k: int = 10,
    data: Any = None,
    dense_budget: int = DEFAULT_DENSE_BUDGET,
    memory_budget: int | None = None,
    fisher: str = "true",
    runtime: int | None = None,
    calibrate: bool = True,
) -> Plan:
    """Predict peak memory and time of each stage of a fit + scan with these settings; suggest settings that fit
    ``memory_budget`` bytes.

    Stages: ``covariance`` (the A/S pass), ``eigh`` (eigendecompositions), ``eigenvalues`` (the EK-FAC Λ pass;
    ``diagonal`` for that strategy), ``queries`` (building the rank-k query store) and ``scan`` (the streaming
    pass with the store resident). ``data``: a few training examples for calibration (required for
    non-language-model tasks; for :class:`CausalLM` random tokens of ``seq_len`` are used otherwise).
    ``runtime``: bytes the process holds besides the model (measured now when None: this process's RSS minus
    the model on the CPU; 0 on CUDA). ``calibrate=False`` skips the timing (memory still needs one forward +
    backward of one sequence).
    """
    task = task if task is not None else CausalLM()
    tracked = select_layers(model, layers if layers is not None else task.default_layers(model))
    for x in tracked:
        split_sizes(x.width, blocks)
        split_sizes(x.d_out, blocks)
    device = model_device(model)
    cuda = device.type == "cuda"
    model_bytes = _model_bytes(model)
    dtype = compute_dtype(model)
    item = torch.finfo(dtype).bits // 8
    model_item = next(model.parameters()).element_size()
    one = task.collate(_calibration_examples(model, task, data, 1, seq_len))
    with eval_mode(model):
        saved1, captured1, logits1 = _saved_activation_bytes(model, task, tracked, one)
        shared = _shared_inputs(model, task, tracked, one)
    shapes = _Shapes(tracked, shared, item)
    # measured after one pass, so that memory-mapped weights are resident, as they are once a run starts
    baseline = int(torch.cuda.memory_allocated(device)) if cuda else _rss()
    if runtime is None:
        runtime = 0 if cuda else max(0, baseline - (model_bytes if device.type == "cpu" else 0))

    def activations(b: int, sampled: bool = False) -> int:
        # saved tensors for the backward and the gradients flowing back (about as large at their peak), the
        # captured ā/g (+ a compute-dtype copy when the model is not in it), and for sampled labels the
        # probabilities and their running sum over the vocabulary
        cast = captured1 if model_item != item else 0
        return b * (2 * saved1 + captured1 + cast + (2 * logits1 if sampled else 0))

    sampled = fisher == "true"
    tokens = batch_size * seq_len
    widest = max(x.width for x in tracked)
    outs = max(x.d_out for x in tracked)
    base = {"runtime": runtime, "model": model_bytes}
    cov = shapes.cov(blocks)
    lam = shapes.lam()
    eig = shapes.eig()
    factors_bytes = {"identity": 0, "diagonal": lam, "kfac": cov + lam + eig, "ekfac": cov + lam + eig}[strategy]
    stages: list[Stage] = []
    fit_stages = stages_of(strategy)
    if "covariance" in fit_stages:
        stages.append(
            Stage(
                "covariance",
                {
                    **base,
                    "activations": activations(batch_size, sampled),
                    "A/S sums": cov,
                    "casts": tokens * widest * item,
                },
            )
        )
        d = shapes.largest_block(blocks)
        stages.append(
            Stage(
                "eigh",
                {**base, "A/S sums": cov, "eigenbases": cov, "workspace": d * d * (item + 40)},
                note=f"largest block {d}",
            )
        )
    if "eigenvalues" in fit_stages or "diagonal" in fit_stages:
        name = "eigenvalues" if "eigenvalues" in fit_stages else "diagonal"
        parts = {
            **base,
            "activations": activations(batch_size, sampled),
            "Λ sums": lam,
            "rotations": tokens * (widest + outs) * item,
            "per-sequence gradient": widest * outs * item,
        }
        if name == "eigenvalues":
            parts["eigenbases"] = cov
        stages.append(Stage(name, parts))
    q_batch = min(n_queries, 16)  # QueryStore.build compresses 16 queries at a time
    store_bytes, exact_bytes = shapes.store(n_queries, rank)[0], shapes.store(q_batch, rank)[1]
    largest_layer = max(x.d_out * x.width for x in tracked) * q_batch
    stages.append(
        Stage(
            "queries",
            {
                **base,
                "factors": factors_bytes,
                "activations": activations(q_batch),
                "query gradients": 2 * exact_bytes,
                "rank-k SVD": largest_layer * 8 * 2 if rank is not None else 0,
                "query store": store_bytes,
            },
            note=f"{n_queries} queries",
        )
    )
    dense_extra = 0
    if rank is not None:
        for x in tracked:
            low = rank * (x.d_out + x.width) < x.d_out * x.width
            costs = contraction_costs(n_queries, rank if low else None, seq_len, x.d_out, x.width)
            if costs["materialize"] < costs["tokens"] and low:
                extra = n_queries * x.d_out * x.width * 4
                if dense_extra + extra <= dense_budget:
                    dense_extra += extra
    k_cols = n_queries * (rank if rank is not None else outs)
    stages.append(
        Stage(
            "scan",
            {
                **base,
                "factors": factors_bytes,
                "query store": store_bytes,
                "scorer copies": store_bytes + dense_extra,
                "activations": activations(batch_size),
                "token products": 2 * tokens * k_cols * item,
                "top-k state": n_queries * top_k * 5 * (len(tracked) + 2) * 8,
            },
            note=f"store {store_bytes / max(1, shapes.store(n_queries, rank)[1]):.0%} of exact",
        )
    )
    if not cuda:
        # the CPU allocator keeps memory freed by an earlier pass (its activations); a later stage that allocates
        # less of that kind does not reuse all of it, so the process's RSS stays that much higher
        earlier = 0
        for st in stages:
            own = st.parts.get("activations", 0)
            st.parts["retained by the allocator"] = max(0, earlier - own)
            earlier = max(earlier, own)
    calibration: dict[str, float] = {
        "saved_bytes_per_sequence": saved1,
        "captured_bytes_per_sequence": captured1,
        "output_bytes_per_sequence": logits1,
        "baseline": baseline,
    }
    if calibrate:
        examples = _calibration_examples(model, task, data, batch_size, seq_len)
        with eval_mode(model):
            times = _calibrate_times(model, task, tracked, examples, shapes, blocks, rank, n_queries)
        calibration.update(times)
        for s in stages:
            if s.name in ("covariance", "eigenvalues", "diagonal", "scan"):
                s.seconds = times[s.name] * n_train
            elif s.name == "queries":
                s.seconds = times["queries"] * n_queries
            elif s.name == "eigh":
                s.seconds = times["eigh_per_d3"] * sum(
                    sum(b**3 for b in split_sizes(x.width, blocks)) * (shared.get(x.name, x.name) == x.name)
                    + sum(b**3 for b in split_sizes(x.d_out, blocks))
                    for x in tracked
                )
    settings = {
        "strategy": strategy,
        "layers": len(tracked),
        "blocks": blocks,
        "rank": rank,
        "n_queries": n_queries,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "n_train": n_train,
    }
    result = Plan(settings, stages, str(device), "device memory" if cuda else "peak RSS", calibration=calibration)
    if memory_budget is not None:
        result.suggestions = _suggest(
            result,
            shapes,
            memory_budget,
            blocks,
            rank,
            n_queries,
            batch_size,
            lambda b: activations(b, sampled),
            strategy,
        )
    return result


def _suggest(
    p: Plan,
    shapes: _Shapes,
    budget: int,
    blocks: int,
    rank: int | None,
    n_queries: int,
    batch_size: int,
    activations,
    strategy: str,
) -> dict[str, Any]:
    """Settings within ``budget``: fewest blocks for the fit, the largest batch, rank and resident queries."""
    out: dict[str, Any] = {"budget": _fmt_bytes(budget), "fits": p.peak <= budget}

    def fit_peak(o: int, b: int) -> int:
        peak = 0
        for s in p.stages:
            if s.name not in ("covariance", "eigh", "eigenvalues", "diagonal"):
                continue
            parts = dict(s.parts)
            scale = shapes.cov(o) / max(1, shapes.cov(blocks))
            for key in ("A/S sums", "eigenbases"):
                if key in parts:
                    parts[key] = int(parts[key] * scale)
            if "workspace" in parts:
                d = shapes.largest_block(o)
                parts["workspace"] = d * d * (shapes.item + 40)
            if "activations" in parts:
                parts["activations"] = activations(b)
            peak = max(peak, sum(parts.values()))
        return peak

    if strategy_record(strategy).basis:
        limit = min(min(x.width, x.d_out) for x in shapes.layers)
        options = [o for o in (1, 2, 4, 8, 16, 32, 64) if o <= limit]
        good = [o for o in options if fit_peak(o, batch_size) <= budget] or [
            o for o in options if fit_peak(o, 1) <= budget
        ]
        out["blocks"] = good[0] if good else None
        if not good:
            out["blocks_note"] = (
                "no block count fits the fit stages in the budget: track fewer layers per run "
                "(layer-group partitions, fit_partition(layers=...))"
            )
    o = out.get("blocks") or blocks
    batches = [b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256) if fit_peak(o, b) <= budget]
    out["batch_size"] = batches[-1] if batches else None
    scan = p.stage("scan")
    others = sum(v for k, v in scan.parts.items() if k not in ("query store", "scorer copies", "token products"))
    per_query_store = shapes.store(1, rank)[0]
    per_query = 2 * per_query_store + 2 * batch_size * int(p.settings["seq_len"]) * (rank or 1) * shapes.item
    out["resident_queries"] = max(0, (budget - others) // max(1, per_query))
    ranks = [
        r
        for r in (8, 16, 32, 64, 128, 256)
        if others
        + n_queries * (2 * shapes.store(1, r)[0] + 2 * batch_size * int(p.settings["seq_len"]) * r * shapes.item)
        <= budget
    ]
    out["rank"] = ranks[-1] if ranks else None
    return out


def measure_peak_rss(fn, *args: Any, interval: float = 0.002, **kwargs: Any) -> tuple[Any, int]:
    """Run ``fn`` while sampling this process's RSS in a thread; (its result, the peak RSS in bytes)."""
    import threading

    import psutil

    proc = psutil.Process(os.getpid())
    peak = [proc.memory_info().rss]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            stop.wait(interval)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        result = fn(*args, **kwargs)
    finally:
        stop.set()
        thread.join()
    peak[0] = max(peak[0], proc.memory_info().rss)
    return result, peak[0]
