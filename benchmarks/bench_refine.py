"""What the default refinement costs beside the scan it serves (one run, one machine, thread count stated).

Setup: the built-in SmolLM2-135M-Instruct (de-quantized from a 4-bit GGUF), EK-FAC on the MLPs of blocks 0-5
fitted on the first ``--fit`` KJV verses (not timed), Q = ``--queries`` verse-completion queries, and a scan of the
first ``--verses`` verses. Timed, in this order: the plain query store (the curvature's own answer), the default
refinement (the plan ``scan`` would choose: steps and sample from ``plan_refinement``), the scan with the refined
store (tokens on, as the CLI runs it), and the leave-one-in factors of its hits. Reported: each time, refinement /
scan measured against the cost model's prediction, and the plan the cost model makes at 100,000 sequences.

    .venv/bin/python benchmarks/bench_refine.py [--verses 4096] [--queries 16] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import influencer as inf
from influencer.data import kjv_verses, split_verse_queries, tokenize_queries, tokenize_texts
from influencer.models import load_model
from influencer.refine_plan import GNH_PASS_COST, default_inverse, pass_flops, plan_refinement, scan_pass_cost

LAYERS = r"model\.layers\.[0-5]\.mlp\."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--verses", type=int, default=4096)
    parser.add_argument("--fit", type=int, default=256)
    parser.add_argument("--queries", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model("smollm2-135m")
    task = inf.CausalLM(pad_token_id=tok.pad_token_id)
    verses = [v["text"] for v in kjv_verses(args.verses)]
    train = tokenize_texts(tok, verses)
    prompts, completions = split_verse_queries([v["text"] for v in kjv_verses(args.queries, start=20_000)])
    queries = tokenize_queries(tok, prompts, completions)
    curv = inf.fit_curvature(model, task, {k: v[: args.fit] for k, v in train.items()}, layers=LAYERS, batch_size=16)
    curv.n_train = args.verses
    rows: list[tuple[str, float, str]] = []

    def timed(name: str, fn, note: str = ""):
        t = time.perf_counter()
        out = fn()
        rows.append((name, time.perf_counter() - t, note))
        print(f"{name}: {rows[-1][1]:.1f}s {note}", flush=True)
        return out

    q = len(prompts)
    timed("plain query store", lambda: inf.QueryStore.build(model, task, curv, queries, rank=32, batch_size=16))
    inverse, plan = default_inverse(model, task, curv, train, refine="auto", n_queries=q, n_scan=args.verses, rank=32)
    assert plan is not None
    store = timed(
        "refined query store (default plan)",
        lambda: inf.QueryStore.build(model, task, inverse, queries, rank=32, batch_size=16),
        f"{plan.steps} CG steps over {plan.sample} sequences; predicted {plan.predicted:.2f} × the scan",
    )
    result = timed(
        "scan (refined store, tokens on)",
        lambda: inf.scan(
            model, task, curv, queries, train, store=store, batch_size=args.batch_size, self_correct=False
        ),
        f"{args.verses} sequences",
    )
    from influencer.self_curvature import hit_factors

    lists = (result.state.top, result.state.bottom, *result.state.bands.values())
    pool = sorted({int(i) for t in lists for i in t.indices.flatten()} - {-1})
    timed(
        "leave-one-in factors of the hits",
        lambda: hit_factors(model, task, inverse, train, pool, n_train=args.verses),
        f"{len(pool)} hits (top 10 lists; the default scan uses a pool of 3 × top_k)",
    )
    t_refine = rows[1][1] - rows[0][1]
    t_scan = rows[2][1]
    layers = curv.bind(model)
    cost = scan_pass_cost(q, layers, 32, pass_flops(model))
    large = plan_refinement(q, 100_000, 100_000, scan_cost=cost)
    print(f"\n`{' '.join(sys.argv)}` — {args.threads} threads, {torch.get_num_threads()} torch threads\n")
    print("| stage | seconds | note |\n|---|---:|---|")
    for name, s, note in rows:
        print(f"| {name} | {s:.1f} | {note} |")
    print(
        f"\nrefinement (refined − plain store) / scan: measured **{t_refine / t_scan:.2f}**, predicted "
        f"{plan.predicted:.2f} (allowed {plan.share:.2f}; GNH_PASS_COST = {GNH_PASS_COST}, scan cost "
        f"{cost:.3f} passes per token).\nAt 100,000 sequences the plan is {large.steps} steps over {large.sample} "
        f"sequences: predicted **{large.predicted:.3f}** of the scan (allowed {large.share:.2f})."
    )


if __name__ == "__main__":
    main()
