"""The word-order probe (paper §5.3.4) on the fine-tuned SmolLM2 of ``factkit.py``.

For each of ``--facts`` planted facts, ``influencer.probe.word_order_probe`` scores synthetic sequences that place
the fact's own-wording prompt before or after its answer (and controls) against that query, with one
refined inverse (``--steps`` CG steps over a seeded sample of ``--sample`` corpus sequences, preconditioned by
EK-FAC). The paper found the reversed order nearly without influence; the table gives, per fact, the mean
influence of each condition and the ratio prompt→completion / completion→prompt, then the medians over facts.

    .venv/bin/python benchmarks/probe_facts.py [--facts 0,4,8,...] [--steps 3] [--sample 64]

The phrases are the prompt ("The capital of Zorvania is") and the answer ("Quellmoor"), so a sequence reads
"… The capital of Zorvania is Quellmoor. …" in one order and "… Quellmoor. The capital of Zorvania is …" in the other.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

import influencer as inf
from influencer.io import atomic_write_json
from influencer.probe import CONDITIONS, word_order_probe
from influencer.refine import RefinedInverse
from influencer.refine_plan import sample_rows
from influencer.tasks import take_rows

from bench_facts import LAYERS, fitted
from factdata import FACTS
from factkit import fact_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--facts", default=",".join(str(i) for i in range(0, 48, 6)))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--sample", type=int, default=64)
    parser.add_argument("--layers", default=LAYERS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/out/probe")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    setup = fact_model()
    task = inf.CausalLM(pad_token_id=setup.tokenizer.pad_token_id)
    curv, _ = fitted(setup, task, args.layers, "ekfac", 16)
    n = len(setup.docs)
    rows = sample_rows(n, args.sample, 0)
    inverse = RefinedInverse(setup.model, task, curv, take_rows(setup.train, rows), steps=args.steps)
    results = []
    t0 = time.perf_counter()
    for f in (int(x) for x in args.facts.split(",")):
        fact = FACTS[f]
        prompt, completion = fact.own
        r = word_order_probe(setup.model, task, inverse, setup.tokenizer, prompt, completion, n_train=n)
        results.append((f, r))
        print(f"fact {f}: ratio {r.ratio:.3g}  " + "  ".join(f"{c} {r.mean(c):.4g}" for c in CONDITIONS), flush=True)
    lines = [
        f"`{' '.join(sys.argv)}` — {len(results)} facts, inverse: {args.steps} CG steps over {args.sample} sampled "
        f"sequences ({time.perf_counter() - t0:.0f} s)",
        "",
        "| fact | " + " | ".join(CONDITIONS) + " | ratio |",
        "|---|" + "---:|" * (len(CONDITIONS) + 1),
    ]
    for f, r in results:
        lines.append(f"| {f} | " + " | ".join(f"{r.mean(c):.3g}" for c in CONDITIONS) + f" | {r.ratio:.3g} |")
    med = {c: statistics.median(r.mean(c) for _, r in results) for c in CONDITIONS}
    lines.append(
        "| median | "
        + " | ".join(f"{med[c]:.3g}" for c in CONDITIONS)
        + f" | {statistics.median(r.ratio for _, r in results):.3g} |"
    )
    table = "\n".join(lines) + "\n"
    print(table)
    out = Path(args.out) / setup.folder.name
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(
        out / "results.json", {"command": " ".join(sys.argv), "facts": {str(f): r.to_dict() for f, r in results}}
    )
    (out / "table.md").write_text(table)


if __name__ == "__main__":
    main()
