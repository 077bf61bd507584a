"""Speed of the streaming scan (``influencer.scan``) against the floor of a plain training step, side by side.

For each setup and each number of resident queries Q (default 1, 16, 64, 256, rank-32 query store), on the same
training data and batch size:

- floor: forward + ``loss.backward()`` of the summed next-token NLL with parameter gradients (``bench_fit``'s
  floor: a training step without the optimizer);
- scan: ``inf.scan(..., store=store, rank=32, top_k=10, tokens=False)``, the one-pass scoring of every training
  sequence against every query (top-k ±, layer bands, running totals), with the contraction order chosen per
  layer by the cost model ("auto") and, to judge that choice, forced to ``contraction="tokens"`` and
  ``contraction="materialize"``;
- token pass: the targeted second pass that splits every hit over its tokens
  (``influencer.scan.attribute_tokens``, what ``tokens=True`` adds to a scan) on the hits of the auto scan.

The EK-FAC curvature is fitted once per setup and the query store is built once per setup, both outside the
timed region. The store is built for the largest Q (in chunks of queries, see ``build_store``) and every smaller
Q uses its first Q queries. Setups (defaults):

1. ``tiny``: ``bench_fit``'s random-init float32 Llama (4 layers, hidden 256, MLP 1024, 4 heads, vocab 4096),
   512 random-token sequences × 64 tokens, batch 32, MLP layers; queries: random 24-token sequences whose last
   12 tokens are the completion;
2. ``smollm2``: SmolLM2-135M-Instruct (built-in, float32), the 90 MLP linears of its 30 blocks, 64 KJV sequences × 48
   tokens (verses packed end to end), batch 8; queries: KJV verses from verse 20000 on, split in the middle
   into prompt and completion. Only the first ``--smol-distinct`` (16) queries are distinct (building the store
   costs 10–20 s per query on one core); larger Q repeat them, which changes no shape and so no cost (the hits of
   the token pass already cover most of the 64 sequences at Q = 16).

Each measurement is warmed up once on the first two batches; then the floor and the scans are repeated in turn
and the table reports the best (min) of the repeats.

    .venv/bin/python benchmarks/bench_scan.py                     # full sizes (about 40 minutes on an idle core)
    .venv/bin/python benchmarks/bench_scan.py --quick             # smoke run
    .venv/bin/python benchmarks/bench_scan.py --profile --write   # + stage breakdown, recorded in RESULTS.md
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import os
import shlex
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import influencer as inf
from influencer import capture as capture_mod
from influencer.queries import LayerQueries, QueryStore

from benchkit import (
    RESULTS,
    SEED,
    Setup,
    Timers,
    environment,
    floor_pass,
    full_rows,
    load_average,
    patched,
    random_rows,
    smollm2_packed,
    subset,
    tiny_llama,
    with_rest,
    write_results,
)

# the package (the attribute ``influencer.scan`` is the function of the same name)
scan_mod = importlib.import_module("influencer.scan")
_LayerScorer = importlib.import_module("influencer.scan.contract")._LayerScorer
_State = importlib.import_module("influencer.scan.topk")._State


TARGET = 1.5  # scan ≤ 1.5 × floor at Q = 64 (issue 3)
TARGET_Q = 64
MODES = ("auto", "tokens", "materialize")
GiB = 2**30


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ setups


@dataclass
class ScanSetup:
    setup: Setup
    queries: dict[str, torch.Tensor]  # the distinct queries (tokenized)
    distinct: int
    query_note: str
    curv: Any = None
    fit_s: float = 0.0
    store: QueryStore | None = None  # for the largest Q
    store_s: float = 0.0
    store_chunk: int = 0


def tiny_setup(args: argparse.Namespace) -> ScanSetup:
    """bench_fit's tiny setup, plus random queries."""
    model, desc = tiny_llama(args.tiny_vocab, max(args.tiny_len, args.tiny_query_len))
    train_ids = random_rows(args.tiny_vocab, args.tiny_seqs, args.tiny_len)
    setup = Setup("tiny", desc, model, inf.CausalLM(pad_token_id=0), full_rows(train_ids), args.tiny_batch)
    d = min(args.distinct or max(args.q), max(args.q))
    ids = random_rows(args.tiny_vocab, d, args.tiny_query_len, seed=SEED + 1)
    prompt = args.tiny_query_len // 2
    queries = {"input_ids": ids, "prompt_length": torch.full((d,), prompt)}
    note = f"random {args.tiny_query_len}-token sequences, completion = the last {args.tiny_query_len - prompt} tokens"
    return ScanSetup(setup, queries, d, note)


def smollm2_setup(args: argparse.Namespace) -> ScanSetup:
    """bench_fit's SmolLM2 setup (same packing of KJV verses), plus KJV verse queries."""
    from influencer.data import kjv_verses, split_verse_queries, tokenize_queries

    tokenizer, setup = smollm2_packed(args.smol_seqs, args.smol_len, args.smol_batch)
    d = min(args.smol_distinct, max(args.q))
    texts = [v["text"] for v in kjv_verses(d, start=args.smol_query_start)]
    prompts, completions = split_verse_queries(texts)
    queries = tokenize_queries(tokenizer, prompts, completions, max_length=args.smol_query_max)
    lengths = queries["attention_mask"].sum(1).float()
    note = (
        f"KJV verses {args.smol_query_start}–{args.smol_query_start + d - 1} split in the middle into prompt / "
        f"completion ({lengths.mean():.0f} tokens on average, at most {args.smol_query_max})"
    )
    if d < max(args.q):
        note += f"; the first {d} are distinct, larger Q repeat them (same shapes, same cost)"
    return ScanSetup(setup, queries, d, note)


# ------------------------------------------------------------------------------------------------ query store


def dense_bytes_per_query(layers: list[Any]) -> int:
    return sum(x.d_out * x.width * 4 for x in layers)


def build_store(s: ScanSetup, rank: int, chunk_bytes: int) -> None:
    """The rank-k store of the distinct queries: ``QueryStore.build`` on chunks of queries, concatenated.

    ``QueryStore.build`` holds the dense gradients [Q, d_out, w] of every layer, and their preconditioned copy,
    before compressing (Q = 64 on SmolLM2 would need about 40 GB), so it is called on chunks of queries that fit
    ``chunk_bytes``; the truncated SVD is per query, so chunking changes nothing.
    """
    setup = s.setup
    layers = s.curv.bind(setup.model)
    per_query = 2 * dense_bytes_per_query(layers)
    chunk = max(1, min(s.distinct, chunk_bytes // per_query))
    parts = []
    t0 = time.perf_counter()
    for lo in range(0, s.distinct, chunk):
        sub = {k: v[lo : lo + chunk] for k, v in s.queries.items()}
        parts.append(inf.QueryStore.build(setup.model, setup.task, s.curv, sub, rank=rank))
        log(
            f"  [{setup.name}] store: {min(lo + chunk, s.distinct)}/{s.distinct} queries "
            f"({time.perf_counter() - t0:.0f} s)"
        )
    s.store_s, s.store_chunk = time.perf_counter() - t0, chunk

    def cat(name: str, attr: str) -> torch.Tensor | None:
        ts = [getattr(p.layers[name], attr) for p in parts]
        return None if ts[0] is None else torch.cat(ts)

    out = {n: LayerQueries(n, cat(n, "dense"), cat(n, "left"), cat(n, "right")) for n in parts[0].layers}
    s.store = QueryStore(layers=out, rank=rank, n_queries=s.distinct, meta=parts[0].meta)


def first_queries(store: QueryStore, q: int) -> QueryStore:
    """The store of the first q queries: views when q ≤ the distinct queries, else the distinct ones repeated."""
    idx = None if q <= store.n_queries else torch.arange(q) % store.n_queries

    def head(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        return t[:q] if idx is None else t[idx]

    layers = {n: LayerQueries(n, head(x.dense), head(x.left), head(x.right)) for n, x in store.layers.items()}
    return QueryStore(layers=layers, rank=store.rank, n_queries=q, meta=store.meta)


def release_memory() -> None:
    """gc, then hand freed heap back to the OS (glibc keeps it otherwise, and the memory checks would fail)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)


def wait_for_memory(need: int, max_s: float, what: str, poll_s: float = 30.0) -> bool:
    """True once ``need`` bytes are available (other processes come and go), False after max_s."""
    t0 = time.perf_counter()
    while True:
        release_memory()
        avail = mem_available()
        if need <= avail:
            return True
        if time.perf_counter() - t0 >= max_s:
            return False
        log(f"  {what}: needs ~{need / GiB:.1f} GiB, {avail / GiB:.1f} GiB available; waiting")
        time.sleep(poll_s)


# ------------------------------------------------------------------------------------------------ passes


def timed(fn: Callable[[], Any]) -> float:
    """Wall-clock seconds of ``fn()``."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run_scan(
    s: ScanSetup,
    store: QueryStore,
    train: dict[str, torch.Tensor],
    mode: str,
    args: argparse.Namespace,
    dense_budget: int,
) -> scan_mod.ScanResult:
    setup = s.setup
    q = store.n_queries
    idx = torch.arange(q) % s.distinct
    queries = {k: v[idx] for k, v in s.queries.items()}  # the store's queries (scan digests them)
    return inf.scan(
        setup.model,
        setup.task,
        s.curv,
        queries,
        train,
        store=store,
        rank=args.rank,
        top_k=args.top_k,
        batch_size=setup.batch_size,
        tokens=False,
        progress=False,
        contraction=None if mode == "auto" else mode,
        dense_budget=dense_budget,
    )


def run_tokens(s: ScanSetup, store: QueryStore, train: dict[str, torch.Tensor], result: scan_mod.ScanResult) -> None:
    """The token-attribution second pass, exactly as ``scan(..., tokens=True)`` runs it after the scan."""
    setup = s.setup
    scan_mod.attribute_tokens(
        setup.model,
        setup.task,
        store,
        s.curv.bind(setup.model),
        setup.task.as_dataset(train),
        result,
        batch_size=setup.batch_size,
    )


def hit_sequences(result: scan_mod.ScanResult) -> int:
    st = result.state
    idx = torch.cat([t.indices.flatten() for t in (st.top, st.bottom, *st.bands.values())])
    return int(idx[idx >= 0].unique().numel())


def mem_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


@dataclass
class QResult:
    q: int
    store_report: str = ""
    store_bytes: int = 0
    floor: list[float] = field(default_factory=list)  # floors measured in this Q's rounds
    modes: dict[str, str] = field(default_factory=dict)
    times: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))  # mode | "token pass"
    same_as_auto: dict[str, bool] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    hits: int = 0
    predicted: dict[str, float] = field(default_factory=dict)  # contraction multiply-adds per sequence


@dataclass
class Measurement:
    floor: list[float] = field(default_factory=list)
    per_q: list[QResult] = field(default_factory=list)
    profile: dict[str, dict[str, float]] | None = None
    profile_layers: dict[str, float] | None = None


def predicted_costs(s: ScanSetup, store: QueryStore, modes: dict[str, str]) -> dict[str, float]:
    """Σ over layers of the cost model's multiply-adds per sequence: auto (the chosen modes), tokens, materialize."""
    layers = s.curv.bind(s.setup.model)
    t = float(s.setup.shape[1])
    out = {m: 0.0 for m in MODES}
    for x in layers:
        lq = store.layers[x.name]
        c = scan_mod.contraction_costs(lq.n_queries, lq.rank, t, x.d_out, x.width)
        out["tokens"] += c["tokens"]
        out["materialize"] += c["materialize"]
        out["auto"] += c[modes[x.name]]
    return out


def measure(s: ScanSetup, args: argparse.Namespace) -> Measurement:
    """Per Q, ``repeats`` rounds of: floor, auto scan, forced scans, token pass (so each Q's ratios divide times
    taken under the same background load)."""
    setup = s.setup
    assert s.store is not None
    layers = s.curv.bind(setup.model)
    dense_per_q = dense_bytes_per_query(layers)
    warm = subset(setup.train, min(len(setup.train["input_ids"]), 2 * setup.batch_size))
    m = Measurement()
    floor_pass(setup, warm)
    budget = args.dense_budget_mib * 2**20
    for q in args.q:
        store_bytes = (s.store.nbytes() // s.store.n_queries) * q
        r = QResult(q)
        m.per_q.append(r)
        # the store (if repeated), the scorers' copies of it in contraction layout, dense copies within budget
        need = 2 * store_bytes + min(budget, q * dense_per_q) + 512 * 2**20
        if not wait_for_memory(need, args.mem_wait, f"[{setup.name}] Q={q}"):
            r.skipped = {x: f"needs ~{need / GiB:.1f} GiB" for x in (*MODES, "token pass")}
            log(f"  [{setup.name}] Q={q}: skipped, needs ~{need / GiB:.1f} GiB")
            continue
        store = first_queries(s.store, q)
        r.store_report, r.store_bytes = store.memory_report(), store.nbytes()
        r.modes = dict(run_scan(s, store, warm, "auto", args, budget).meta["modes"])
        r.predicted = predicted_costs(s, store, r.modes)
        todo = ["auto"]
        for forced in ("tokens", "materialize"):
            dense = q * dense_per_q
            if forced not in args.modes:
                r.skipped[forced] = "not run (--modes)"
            elif all(v == forced for v in r.modes.values()):
                r.same_as_auto[forced] = True
            elif forced == "materialize" and dense > args.max_dense_gib * GiB:
                r.skipped[forced] = f"not run: dense copies {dense / GiB:.1f} GiB > --max-dense-gib"
            elif forced == "materialize" and not wait_for_memory(
                2 * store_bytes + dense + GiB, args.mem_wait, f"[{setup.name}] Q={q} materialize"
            ):
                r.skipped[forced] = f"not run: dense copies {dense / GiB:.1f} GiB exceed free memory"
            else:
                todo.append(forced)
        for mode in todo[1:]:
            run_scan(s, store, warm, mode, args, budget)  # warm-up
        if args.token_pass:
            run_tokens(s, store, warm, run_scan(s, store, warm, "auto", args, budget))
        for rep in range(args.repeats):
            release_memory()
            r.floor.append(timed(lambda: floor_pass(setup, setup.train)))
            result = None
            for mode in todo:
                release_memory()
                t0 = time.perf_counter()
                res = run_scan(s, store, setup.train, mode, args, budget)
                r.times[mode].append(time.perf_counter() - t0)
                if mode == "auto":
                    result = res
                del res
            if args.token_pass and result is not None:
                release_memory()
                r.hits = hit_sequences(result)
                r.times["token pass"].append(timed(lambda res=result, st=store: run_tokens(s, st, setup.train, res)))
            del result
            log(
                f"  [{setup.name}] Q={q} repeat {rep + 1}/{args.repeats}: floor {r.floor[-1]:.2f} s, "
                + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in r.times.items())
                + f" (modes {mode_summary(r.modes)}; load {load_average()})"
            )
        m.floor.extend(r.floor)
        del store
        release_memory()
    return m


def mode_summary(modes: dict[str, str]) -> str:
    if not modes:
        return "–"
    c = Counter(modes.values())
    return ", ".join(f"{k} {v}" for k, v in sorted(c.items()))


def mode_detail(modes: dict[str, str]) -> str:
    """Which layers took the minority mode, grouped by module type: 'materialize: down_proj in blocks 0, 3'."""
    c = Counter(modes.values())
    if len(c) < 2:
        return ""
    minority = min(c, key=lambda k: c[k])
    groups: dict[str, list[str]] = defaultdict(list)
    for name, mode in modes.items():
        if mode == minority:
            parts = name.split(".")
            block = next((p for p in parts if p.isdigit()), "?")
            groups[parts[-1]].append(block)
    return f"{minority}: " + "; ".join(f"{k} in blocks {', '.join(v)}" for k, v in groups.items())


# ------------------------------------------------------------------------------------------------ profile


def profile_setup(
    s: ScanSetup, q: int, args: argparse.Namespace
) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """One instrumented auto scan and one token pass at Q = q → ({pass: {stage: s}}, {layer kind [mode]: s})."""
    setup = s.setup
    assert s.store is not None
    store = first_queries(s.store, q)
    budget = args.dense_budget_mib * 2**20
    out: dict[str, dict[str, float]] = {}
    t = Timers()
    total = timed(lambda: floor_pass(setup, setup.train, t))
    out["floor"] = with_rest(total, dict(t.seconds), "rest")
    per_layer: dict[str, float] = defaultdict(float)

    def per_layer_scores(f: Callable[..., Any], t: Timers) -> Callable[..., Any]:
        def timed_scores(self: Any, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
            t0 = time.perf_counter()
            with t.time(f"contraction [{self.mode}]"):
                res = f(self, a, g)
            per_layer[f"{self.layer.name.split('.')[-1]} [{self.mode}]"] += time.perf_counter() - t0
            return res

        return timed_scores

    result: scan_mod.ScanResult | None = None
    for name in ("scan", "token pass"):
        t = Timers()
        patches = [
            (scan_mod, "batches", lambda f, t=t: t.wrap_iter("data (collate)", f)),
            (setup.task, "forward", lambda f, t=t: t.wrap("forward (+ capture hooks)", f)),
            (setup.task, "train_loss", lambda f, t=t: t.wrap("loss (NLL)", f)),
            (capture_mod.Capture, "gradients", lambda f, t=t: t.wrap("_gradients", f)),
            (capture_mod, "_per_token", lambda f, t=t: t.wrap("_per_token", f)),
            (_LayerScorer, "__init__", lambda f, t=t: t.wrap("scorer setup (query copies, dense P)", f)),
            (scan_mod, "_choose_modes", lambda f, t=t: t.wrap("cost model", f)),
            (_State, "update", lambda f, t=t: t.wrap("top-k bookkeeping (_State.update)", f)),
            (_State, "merge", lambda f, t=t: t.wrap("top-k bookkeeping (_State.update)", f)),
        ]
        if name == "scan":
            patches.append((_LayerScorer, "scores", lambda f, t=t: per_layer_scores(f, t)))
        else:
            patches.append((_LayerScorer, "token_scores", lambda f, t=t: t.wrap("token contraction", f)))
        with patched(patches) as missing:
            t0 = time.perf_counter()
            if name == "scan":
                result = run_scan(s, store, setup.train, "auto", args, budget)
            else:
                assert result is not None
                run_tokens(s, store, setup.train, result)
            total = time.perf_counter() - t0
        st = dict(t.seconds)
        packaging = st.pop("_per_token", 0.0)
        st["backward (autograd.grad to layer outputs)"] = st.pop("_gradients", 0.0) - packaging
        st["capture packaging (mask ×, bias column)"] = packaging
        if missing:
            st["(not timed, missing: " + ", ".join(missing) + ")"] = 0.0
        rest = "rest (stack, .cpu(), per-hit copies)" if name == "token pass" else "rest (stack, .cpu(), result)"
        out[name] = with_rest(total, st, rest)
    return out, dict(per_layer)


# ------------------------------------------------------------------------------------------------ report


def fmt_ratio(x: float, floor: float, target: float | None = None) -> str:
    r = x / floor
    return f"{r:.2f}×" + ("" if target is None else (" ✅" if r <= target else " ❌"))


def results_table(rows: list[tuple[ScanSetup, Measurement]]) -> str:
    out = [
        "| setup | Q | floor (s) | scan, auto (s) | auto ÷ floor | modes picked (auto) | forced tokens ÷ floor "
        "| forced materialize ÷ floor | token pass (s) | token pass ÷ floor | hit sequences "
        "| scan + token pass ÷ floor |",
        "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for s, m in rows:
        for r in m.per_q:
            f = min(r.floor) if r.floor else min(m.floor, default=float("nan"))
            if "auto" not in r.times:
                out.append(
                    f"| {s.setup.name} | {r.q} | {f:.2f} | – | – | skipped ({r.skipped.get('auto')}) "
                    "| – | – | – | – | – | – |"
                )
                continue
            a = min(r.times["auto"])
            cells = []
            for forced in ("tokens", "materialize"):
                if r.same_as_auto.get(forced):
                    cells.append(f"= auto ({fmt_ratio(a, f)})")
                elif forced in r.times:
                    cells.append(f"{fmt_ratio(min(r.times[forced]), f)} ({min(r.times[forced]):.2f} s)")
                else:
                    cells.append(r.skipped.get(forced, "–"))
            tp = r.times.get("token pass")
            tp_cells = f"{min(tp):.2f} | {fmt_ratio(min(tp), f)}" if tp else "– | –"
            both = fmt_ratio(a + min(tp), f) if tp else "–"
            out.append(
                f"| {s.setup.name} | {r.q} | {f:.2f} | {a:.2f} "
                f"| {fmt_ratio(a, f, TARGET if r.q == TARGET_Q else None)} | {mode_summary(r.modes)} "
                f"| {cells[0]} | {cells[1]} | {tp_cells} | {r.hits or '–'} | {both} |"
            )
    return "\n".join(out) + "\n"


def memory_table(rows: list[tuple[ScanSetup, Measurement]]) -> str:
    out = [
        "| setup | Q | store (`store.memory_report()`) | cost model, contraction multiply-adds per sequence: "
        "auto / tokens / materialize (G) | layers in the minority mode |",
        "|---|---:|---|---|---|",
    ]
    for s, m in rows:
        for r in m.per_q:
            p = r.predicted
            cost = f"{p['auto'] / 1e9:.3g} / {p['tokens'] / 1e9:.3g} / {p['materialize'] / 1e9:.3g}" if p else "–"
            out.append(f"| {s.setup.name} | {r.q} | {r.store_report or '–'} | {cost} | {mode_detail(r.modes) or '–'} |")
    return "\n".join(out) + "\n"


def repeats_table(rows: list[tuple[ScanSetup, Measurement]]) -> str:
    out = ["| setup | what | seconds per repeat |", "|---|---|---|"]
    for s, m in rows:
        for r in m.per_q:
            for k, v in (("floor", r.floor), *r.times.items()):
                out.append(f"| {s.setup.name} | Q={r.q} {k} | {', '.join(f'{x:.2f}' for x in v)} |")
    return "\n".join(out) + "\n"


def profile_table(s: ScanSetup, m: Measurement, q: int) -> str:
    assert m.profile is not None
    floor_total = m.profile["floor"]["total"]
    out = [
        f"**{s.setup.name}**, Q = {q}, auto modes (one instrumented run each; seconds, share of the pass, "
        "and seconds ÷ floor total)\n"
    ]
    for name in ("floor", "scan", "token pass"):
        stages = m.profile[name]
        total = stages["total"]
        out.append(f"| {name} stage | s | % of pass | × floor |\n|---|---:|---:|---:|")
        for k, v in stages.items():
            if k != "total":
                out.append(f"| {k} | {v:.2f} | {100 * v / total:.1f}% | {v / floor_total:.3f} |")
        out.append(f"| **total** | **{total:.2f}** | 100% | **{total / floor_total:.2f}** |\n")
    if m.profile_layers:
        out.append("| scan contraction by layer type [mode] | s | × floor |\n|---|---:|---:|")
        for k, v in sorted(m.profile_layers.items(), key=lambda kv: -kv[1]):
            out.append(f"| {k} | {v:.2f} | {v / floor_total:.3f} |")
        out.append("")
    return "\n".join(out) + "\n"


def report(args: argparse.Namespace, env: dict[str, str], rows: list[tuple[ScanSetup, Measurement]]) -> str:
    cmd = " ".join(shlex.quote(a) for a in [".venv/bin/python", "benchmarks/bench_scan.py", *sys.argv[1:]])
    parts = [
        "## Streaming scan vs a plain training step (`benchmarks/bench_scan.py`)\n",
        f"Command: `{cmd}`\n",
        "\n".join(f"- {k}: {v}" for k, v in env.items()) + "\n",
        "Setups:\n",
        "\n".join(
            f"- **{s.setup.name}**: {s.setup.description}; {s.setup.shape[0]} sequences × {s.setup.shape[1]} "
            f"tokens, batch {s.setup.batch_size}, layers `{s.setup.layers}` "
            f"({len(s.curv.layers)} linears); EK-FAC (true Fisher) fitted once on the same sequences in "
            f"{s.fit_s:.0f} s; queries: {s.query_note}; rank-{args.rank} store of the {s.distinct} distinct "
            f"queries built once in {s.store_s:.0f} s (`QueryStore.build` on chunks of {s.store_chunk} queries)"
            for s, _ in rows
        )
        + "\n",
        "Floor = forward + `loss.backward()` of the summed next-token NLL with parameter gradients (bench_fit's "
        "floor). Scan = `inf.scan(model, task, curv, queries, train, store=store, rank="
        f"{args.rank}, top_k={args.top_k}, batch_size=B, tokens=False, progress=False)` with the default "
        f"`dense_budget` ({args.dense_budget_mib} MiB) — top-k ±, bands, totals; everything the call does is "
        "timed, including its per-call copies of the store into the contraction layouts. Forced = the same call "
        'with `contraction="tokens"` / `"materialize"` ("= auto" where the cost model already picked that '
        "mode for every layer). Token pass = `influencer.scan.attribute_tokens` on the auto scan's hits (what "
        "`tokens=True` adds), over the distinct hit sequences (top, bottom and three bands per query, "
        f"{args.top_k} each).\n",
        f"Target (issue 3): scan ≤ {TARGET}× floor at Q = {TARGET_Q}. Each Q runs {args.repeats} round(s) of "
        "floor → auto scan → forced scans → token pass after one warm-up of each on the first two batches; the "
        "table shows the best (min) time of each over the rounds and divides it by the best floor of the same "
        "Q's rounds (the background load changed during the run; every time is listed below).\n",
        results_table(rows),
        "Store memory and the cost model:\n",
        memory_table(rows),
        "Every repeat (seconds):\n",
        repeats_table(rows),
    ]
    if any(m.profile for _, m in rows):
        parts.append("### Where the time goes\n")
        parts.extend(profile_table(s, m, args.profile_q) for s, m in rows if m.profile)
    return "\n".join(parts)


# ------------------------------------------------------------------------------------------------ main


def wait_for_idle(pattern: str, max_s: float, poll_s: float = 30.0) -> str:
    """Poll ``pgrep -f pattern`` until nothing matches on two polls in a row (a chain of benchmarks has gaps
    between its scripts), or max_s passed; returns a line for the report."""
    t0 = time.perf_counter()
    idle = 0
    while True:
        found = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()
        found = [p for p in found if int(p) != os.getpid()]
        waited = time.perf_counter() - t0
        idle = 0 if found else idle + 1
        if idle >= 2:
            return f"waited {waited:.0f} s for other benchmark processes to finish"
        if waited >= max_s:
            return (
                f"gave up waiting after {waited:.0f} s; still running: {len(found)} process(es) matching it, "
                f"load average {load_average()}"
            )
        if found:
            log(f"waiting for {len(found)} process(es) matching {pattern!r} ({waited:.0f} s)")
        time.sleep(poll_s)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--setups", default="tiny,smollm2", help="comma-separated: tiny, smollm2 (default both)")
    p.add_argument("--queries", default="1,16,64,256", help="comma-separated numbers of resident queries Q")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--modes", default="auto,tokens,materialize", help="contraction settings to time (auto always)")
    p.add_argument("--no-token-pass", dest="token_pass", action="store_false", help="skip the token pass")
    p.add_argument(
        "--dense-budget-mib",
        type=int,
        default=scan_mod.DEFAULT_DENSE_BUDGET // 2**20,
        help="scan's dense_budget for the auto mode (default: the library default)",
    )
    p.add_argument(
        "--max-dense-gib",
        type=float,
        default=6.0,
        help="skip forced materialize when its dense query copies exceed this (default 6)",
    )
    p.add_argument("--tiny-seqs", type=int, default=512)
    p.add_argument("--tiny-len", type=int, default=64)
    p.add_argument("--tiny-batch", type=int, default=32)
    p.add_argument("--tiny-vocab", type=int, default=4096)
    p.add_argument("--tiny-query-len", type=int, default=24)
    p.add_argument("--distinct", type=int, default=0, help="distinct tiny queries (default: the largest Q)")
    p.add_argument("--smol-seqs", type=int, default=64)
    p.add_argument("--smol-len", type=int, default=48)
    p.add_argument("--smol-batch", type=int, default=8)
    p.add_argument("--smol-distinct", type=int, default=16, help="distinct SmolLM2 queries (default 16)")
    p.add_argument("--smol-query-max", type=int, default=64, help="SmolLM2 query length cap in tokens")
    p.add_argument("--smol-query-start", type=int, default=20000, help="first KJV verse of the SmolLM2 queries")
    p.add_argument(
        "--store-chunk-mib",
        type=int,
        default=2048,
        help="memory for one QueryStore.build chunk (dense + preconditioned gradients)",
    )
    p.add_argument(
        "--mem-wait",
        type=float,
        default=900,
        help="seconds to wait for free memory before skipping a measurement (default 900)",
    )
    p.add_argument("--repeats", type=int, default=2, help="timed repeats after one warm-up (best is kept)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument("--profile", action="store_true", help="add one instrumented run (stage breakdown)")
    p.add_argument("--profile-q", type=int, default=TARGET_Q, help="Q of the instrumented run (default 64)")
    p.add_argument(
        "--wait-idle",
        type=float,
        default=0,
        metavar="SECONDS",
        help="first wait up to this long while processes matching --wait-pattern run",
    )
    p.add_argument("--wait-pattern", default="bench_fit|validate|pb2.py|damp.py")
    p.add_argument("--quick", action="store_true", help="tiny sizes, Q = 1, 4, one repeat: a smoke run")
    p.add_argument("--write", action="store_true", help=f"replace this benchmark's section in {RESULTS.name}")
    args = p.parse_args(argv)
    if args.quick:
        args.tiny_seqs, args.tiny_len, args.tiny_batch = 64, 32, 16
        args.smol_seqs, args.smol_len, args.smol_batch = 16, 32, 8
        args.queries, args.smol_distinct, args.repeats, args.profile_q = "1,4", 2, 1, 4
    args.q = sorted({int(x) for x in args.queries.split(",")})
    args.modes = set(args.modes.split(","))
    if args.repeats < 1 or min(args.q) < 1:
        p.error("--repeats and every Q must be ≥ 1")
    if not args.modes <= set(MODES):
        p.error(f"--modes: choose from {MODES}")
    unknown = set(args.setups.split(",")) - {"tiny", "smollm2"}
    if unknown:
        p.error(f"unknown setup(s) {sorted(unknown)}; choose from tiny, smollm2")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    waited = wait_for_idle(args.wait_pattern, args.wait_idle) if args.wait_idle > 0 else None
    env = environment()
    if waited:
        env["before the start"] = f"{waited} (`pgrep -f '{args.wait_pattern}'`)"
    log(
        f"threads={torch.get_num_threads()} torch={torch.__version__} cpu={env['cpu']} "
        f"load={env['load average (1, 5, 15 min) at start']}"
    )
    builders = {"tiny": tiny_setup, "smollm2": smollm2_setup}
    rows: list[tuple[ScanSetup, Measurement]] = []
    for name in args.setups.split(","):
        t0 = time.perf_counter()
        s = builders[name](args)
        setup = s.setup
        log(f"[{name}] built in {time.perf_counter() - t0:.1f} s: {setup.description}")
        t0 = time.perf_counter()
        s.curv = inf.fit_curvature(
            setup.model, setup.task, setup.train, layers=setup.layers, batch_size=setup.batch_size, progress=False
        )
        s.fit_s = time.perf_counter() - t0
        log(f"  [{name}] EK-FAC fitted in {s.fit_s:.1f} s")
        build_store(s, args.rank, args.store_chunk_mib * 2**20)
        log(f"  [{name}] store of the distinct queries in {s.store_s:.1f} s: {s.store.memory_report()}")
        m = measure(s, args)
        if args.profile and args.profile_q <= max(args.q):
            m.profile, m.profile_layers = profile_setup(s, args.profile_q, args)
            log(f"  [{name}] profiled at Q={args.profile_q}")
        rows.append((s, m))
        s.store = None  # free the store before the next setup (the report needs curv and the setup only)
        gc.collect()
    env["load average (1, 5, 15 min) at end"] = load_average()
    text = report(args, env, rows)
    print(text)
    if args.write:
        write_results(text, "bench_scan")
        log(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
