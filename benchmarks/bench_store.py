"""Cost of the rank-k query store (``QueryStore.build``) against the floor of a plain training step, side by side.

For each setup, in one process and one thread count: the floor (forward + ``loss.backward()`` of the summed
next-token NLL over the setup's training rows, ``benchkit.floor_pass``) and the store of the setup's queries
built three ways, each split into its stages (measurement gradients, solve or rotation back, truncated SVD):
the generic path every inverse took before issue 19 (dense solve, float64 exact truncated SVD; a RefinedInverse
still takes it), the eigenbasis path with the exact SVD, and the default (eigenbasis path, ``svd="auto"``:
randomized where cheaper). The EK-FAC curvature is fitted once per setup outside the timed region
(on a few sequences: the store's cost does not depend on the factors' values). Each timing is the best of
``--repeats``. Each store's scores ⟨P, ∇L(z)⟩ on 32 training rows are compared with those of the uncompressed
store (rank None).

Setups: ``smollm2`` (SmolLM2-135M-Instruct, de-quantized from a 4-bit GGUF; 90 MLP linears; floor = 64 KJV rows
× 48 tokens at batch 8; 16 KJV verse queries, as in ``bench_scan``) and ``tiny`` (``bench_fit``'s 4-layer Llama;
floor = 1,024 random rows × 64 tokens at batch 32; 64 random queries).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_store.py --write      # both setups, recorded in RESULTS.md
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_store.py --setups tiny --quick
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from typing import Any

import torch

import influencer as inf
import influencer.eigenbasis_store as eigen_mod
import influencer.queries as queries_mod

from benchkit import (
    SEED,
    Setup,
    Timers,
    environment,
    floor_pass,
    full_rows,
    patched,
    random_rows,
    smollm2_packed,
    subset,
    tiny_llama,
    write_results,
)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def setups(args: argparse.Namespace) -> list[tuple[Setup, dict[str, torch.Tensor], str]]:
    out = []
    for name in args.setups.split(","):
        if name == "tiny":
            model, desc = tiny_llama(4096, 64)
            train = full_rows(random_rows(4096, 256 if args.quick else 1024, 64))
            q = 8 if args.quick else 64
            ids = random_rows(4096, q, 24, seed=SEED + 1)
            queries = {"input_ids": ids, "prompt_length": torch.full((q,), 12)}
            setup = Setup("tiny", desc, model, inf.CausalLM(pad_token_id=0), train, 32)
            out.append((setup, queries, f"{q} random 24-token queries (completion = the last 12 tokens)"))
        elif name == "smollm2":
            from influencer.data import kjv_verses, split_verse_queries, tokenize_queries

            tok, setup = smollm2_packed(16 if args.quick else 64, 48, 8)
            q = 4 if args.quick else 16
            prompts, completions = split_verse_queries([v["text"] for v in kjv_verses(q, start=20000)])
            queries = tokenize_queries(tok, prompts, completions, max_length=64)
            out.append((setup, queries, f"{q} KJV verses from verse 20000 split into prompt / completion"))
        else:
            raise SystemExit(f"unknown setup {name!r}")
    return out


class GenericInverse:
    """The curvature seen only through the Inverse protocol (solve on dense gradients): the store's generic path,
    which every inverse took before issue 19 (and a RefinedInverse still takes)."""

    def __init__(self, curv: Any):
        self.curvature = curv

    def solve(self, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.curvature.solve(grads)

    def describe(self) -> dict[str, Any]:
        return self.curvature.describe()


PATHS = {  # row label → (generic path?, svd method)
    "generic solve + exact SVD (before)": (True, "exact"),
    "eigenbasis + exact SVD": (False, "exact"),
    "eigenbasis + auto SVD (default)": (False, "auto"),
}
STAGES = ("measurement gradients", "solve / rotation back", "truncated SVD")


def build(
    setup: Setup, curv: Any, queries: dict[str, torch.Tensor], generic: bool, svd: str, chunk: int, rank: int | None
) -> tuple[Any, dict[str, float]]:
    """The store and its stage seconds."""
    t = Timers()
    inverse = GenericInverse(curv) if generic else curv
    patches = [
        (queries_mod, "measurement_gradients", lambda f: t.wrap(STAGES[0], f)),
        (eigen_mod, "eigenbasis_factors", lambda f: t.wrap(STAGES[0], f)),
        (GenericInverse, "solve", lambda f: t.wrap(STAGES[1], f)),
        (eigen_mod, "back_from_eigenbasis", lambda f: t.wrap(STAGES[1], f)),
        (queries_mod, "truncated_svd", lambda f: t.wrap(STAGES[2], f)),
    ]
    with patched(patches):
        t0 = time.perf_counter()
        store = inf.QueryStore.build(setup.model, setup.task, inverse, queries, rank=rank, batch_size=chunk, svd=svd)
        total = time.perf_counter() - t0
    stages = {k: t.seconds[k] for k in STAGES}
    stages["rest"] = total - sum(stages.values())
    stages["total"] = total
    return store, stages


def scores(setup: Setup, curv: Any, queries: dict[str, torch.Tensor], store: Any) -> torch.Tensor:
    """Scores ⟨P, ∇L(z)⟩ [Q, 32] of the store's queries on the first 32 training rows."""
    rows = subset(setup.train, 32)
    kept = inf.scan(
        setup.model,
        setup.task,
        curv,
        queries,
        rows,
        store=store,
        rank=store.rank,
        keep_scores=True,
        tokens=False,
        progress=False,
    )
    return kept.scores


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """max over queries of ‖approx − exact‖ / ‖exact‖."""
    return float(((approx - exact).norm(dim=1) / exact.norm(dim=1).clamp_min(1e-30)).max())


def measure(setup: Setup, queries: dict[str, torch.Tensor], note: str, repeats: int, chunk: int) -> list[str]:
    log(f"[{setup.name}] fitting EK-FAC on 8 rows (untimed)")
    curv = inf.fit_curvature(
        setup.model, setup.task, subset(setup.train, 8), layers=setup.layers, batch_size=8, progress=False
    )
    floor_pass(setup, subset(setup.train, 2 * setup.batch_size))  # warm-up
    floors = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        floor_pass(setup, setup.train)
        floors.append(time.perf_counter() - t0)
    floor = min(floors)
    log(f"[{setup.name}] floor {floor:.2f} s")
    rows, errors = {}, {}
    full = scores(setup, curv, queries, build(setup, curv, queries, False, "exact", chunk, None)[0])
    for label, (generic, svd) in PATHS.items():
        runs = [build(setup, curv, queries, generic, svd, chunk, 32) for _ in range(repeats)]
        rows[label] = min((r[1] for r in runs), key=lambda s: s["total"])
        errors[label] = relative_error(scores(setup, curv, queries, runs[-1][0]), full)
        log(f"[{setup.name}] {label}: {rows[label]}, score error {errors[label]:.4f}")
    n, T = setup.shape
    lines = [
        f"**{setup.name}** — {setup.description}; floor: {n} rows × {T} tokens at batch {setup.batch_size} "
        f"= {floor:.2f} s; queries: {note}, rank 32, {chunk} queries per chunk",
        "",
        "| path | gradients (s) | solve / rotation back (s) | truncated SVD (s) | rest (s) | store (s) | ÷ floor "
        "| score error |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, r in rows.items():
        lines.append(
            f"| {label} | {r[STAGES[0]]:.2f} | {r[STAGES[1]]:.2f} | {r[STAGES[2]]:.2f} | {r['rest']:.2f} | "
            f"{r['total']:.2f} | **{r['total'] / floor:.2f}** | {100 * errors[label]:.2f} % |"
        )
    before, after = rows["generic solve + exact SVD (before)"], rows["eigenbasis + auto SVD (default)"]
    lines += [
        "",
        f"- the default store is {before['total'] / after['total']:.1f}× faster than before; score error = max over "
        "queries of ‖s − s_full‖ / ‖s_full‖ on 32 training rows, s_full from the uncompressed store (rank None): "
        "what rank 32 costs in accuracy",
        "",
    ]
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--setups", default="smollm2,tiny")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--chunk", type=int, default=8, help="queries per QueryStore.build chunk (memory ∝ chunk)")
    p.add_argument("--write", action="store_true", help="record the table in benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    torch.manual_seed(SEED)
    env = environment()
    lines: list[str] = []
    for setup, queries, note in setups(args):
        lines += measure(setup, queries, note, args.repeats, args.chunk)
    cmd = f"OMP_NUM_THREADS={torch.get_num_threads()} .venv/bin/python benchmarks/" + " ".join(
        shlex.quote(a) for a in ["bench_store.py", *(argv if argv is not None else sys.argv[1:])]
    )
    head = ["## Query store (issue 19)", "", f"`{cmd}`", ""] + [f"- {k}: {v}" for k, v in env.items()] + [""]
    section = "\n".join(head + lines)
    print(section)
    if args.write:
        write_results(section, "bench-store")


if __name__ == "__main__":
    main()
