"""Fact tracing on a fine-tuned SmolLM2: does influence find the one training sentence that taught a fact?

The model is SmolLM2-135M-Instruct (de-quantized from a 4-bit GGUF) fine-tuned on KJV verses plus 48 planted facts
about invented entities, each stated once, and two distractors per fact that mention its subject without the
fact (``factkit.py``). For each fact and each query form — its own wording, a paraphrase (paper §5.3.1) and the
reversed order (§5.3.4) — every method ranks the whole corpus (no prefilter) and we record where the fact's own
sentence lands: recall@1, recall@10, mean reciprocal rank, and the time of each method (fit excluded, shown apart).

Methods: BM25 (the paper's prefilter scoring of prompt + completion), gradient dot products (identity), the
paper's plain EK-FAC (``scan(..., refine=0)``), the refined queries alone (``scan(..., self_correct=False)``:
EK-FAC refined within the cost model's budget) and the default path (``scan(...)``: refined, and the kept hits
corrected for their own curvature among a pool of 3 × top_k; it is ranked by its hits, then the rest). With
``--self-correct`` the EK-FAC and refined scores are also ranked after the leave-one-in correction of *every*
sequence (``+self``; factors computed once for the corpus and cached). Each form's 48 queries are one scan, as a
user would ask them.

    .venv/bin/python benchmarks/bench_facts.py [--layers REGEX] [--forms own,paraphrase,reversed] [--threads 2]

Writes benchmarks/out/facts/<run>/results.json and table.md (the table of docs/VALIDATION.md §9).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

import influencer as inf
from influencer.io import atomic_write_json
from influencer.prefilter import BM25Index

from factdata import FACTS
from factkit import FORMS, fact_model

LAYERS = r"model\.layers\.(0|3|6|9|12|15|18|21|24|27)\.mlp\."
METHODS = ("bm25", "gradient-dot", "ekfac", "refined", "default")


def fitted(setup: Any, task: inf.CausalLM, layers: str, strategy: str, batch_size: int) -> tuple[inf.Curvature, float]:
    """The fitted curvature (cached next to the model) and the seconds its fit took."""
    key = hashlib.sha256(f"{layers}|{strategy}".encode()).hexdigest()[:10]
    folder = setup.folder / f"{strategy}-{key}"
    if (folder / "manifest.json").is_file():
        curv = inf.Curvature.load(folder, setup.model)
        return curv, float(json.loads((folder / "fit_seconds.json").read_text())["seconds"])
    t = time.perf_counter()
    curv = inf.fit_curvature(setup.model, task, setup.train, strategy=strategy, layers=layers, batch_size=batch_size)
    seconds = time.perf_counter() - t
    curv.save(folder)
    atomic_write_json(folder / "fit_seconds.json", {"seconds": seconds})
    return curv, seconds


def hits_first(result: inf.ScanResult, scores: torch.Tensor) -> torch.Tensor:
    """A score matrix whose order puts each query's kept (corrected) hits first, in their order, then the rest in
    the order of the uncorrected scores: the ranking a user of the default scan reads."""
    out = scores.clone().to(torch.float64)
    top = float(out.abs().max()) + 1.0
    for q in range(result.n_queries):
        hits = [h.index for h in result.top(q)]
        for r, i in enumerate(hits):
            out[q, i] = top * (len(hits) + 1 - r)
    return out


def ranks_of(scores: torch.Tensor, rows: list[int]) -> list[int]:
    """Rank (1 = best) of each query's target row among all N scores (ties count against it)."""
    return [int((scores[q] >= scores[q, r]).sum()) for q, r in enumerate(rows)]


def report(form: str, method: str, r: dict[str, Any]) -> None:
    print(
        f"{form:10s} {method:13s} R@1 {r['recall@1']:.3f} R@10 {r['recall@10']:.3f} MRR {r['mrr']:.3f} "
        f"{r['seconds']:.0f}s"
        + (f"  median per copy of the fact {r['median_fact_per_copy']:.3g}" if "median_fact_per_copy" in r else ""),
        flush=True,
    )


_FACTORS: dict[str, torch.Tensor] = {}


def self_factors(
    setup: Any, task: inf.CausalLM, curv: inf.Curvature, inverse: dict[str, Any]
) -> tuple[torch.Tensor, float]:
    """Leave-one-in factors of every corpus sequence for the scores of ``inverse`` (cached in the setup folder):
    1 / (1 + c s / N) restores a sequence's own curvature; a sequence in a refined inverse's sample already has
    it at weight 1/sample, so its factor is (1 + c s / sample) / (1 + c s / N)."""
    from safetensors.torch import load_file, save_file

    from influencer.refine import sample_rows
    from influencer.self_curvature import self_correction

    n = len(setup.docs)
    path = (
        setup.folder
        / f"self-curvature-{hashlib.sha256(curv.fingerprint['digest'].encode()).hexdigest()[:8]}.safetensors"
    )
    t = time.perf_counter()
    if "cs" not in _FACTORS:
        if path.is_file():
            _FACTORS.update(load_file(str(path)))
        else:
            out = self_correction(setup.model, task, curv, setup.train, list(range(n)), n_train=n, progress=True)
            _FACTORS["cs"] = torch.tensor([out[i]["c"] * out[i]["s"] for i in range(n)], dtype=torch.float64)
            save_file(_FACTORS, str(path))
    cs = _FACTORS["cs"]
    factor = 1.0 / (1.0 + cs / n)
    if inverse.get("inverse") == "refined":
        rows = sample_rows(inverse["sample_of"], inverse["data_size"], inverse["seed"])
        factor[rows] = factor[rows] * (1.0 + cs[rows] / inverse["data_size"])
    return factor, time.perf_counter() - t


def metrics(ranks: list[int]) -> dict[str, float]:
    n = len(ranks)
    return {
        "recall@1": sum(r == 1 for r in ranks) / n,
        "recall@10": sum(r <= 10 for r in ranks) / n,
        "mrr": sum(1 / r for r in ranks) / n,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", default=LAYERS, help="tracked layers (default: the MLPs of every third block)")
    parser.add_argument("--forms", default=",".join(FORMS))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/out/facts")
    parser.add_argument(
        "--self-correct",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also rank with the leave-one-in factors of every sequence (influencer.self_curvature)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    forms = args.forms.split(",")
    methods = args.methods.split(",")
    setup = fact_model()
    task = inf.CausalLM(pad_token_id=setup.tokenizer.pad_token_id)
    n = len(setup.docs)
    print(f"corpus: {n} sequences ({int(setup.train['attention_mask'].sum())} tokens); model {setup.folder}")
    fits: dict[str, tuple[inf.Curvature, float]] = {}
    results: dict[str, Any] = {"command": " ".join(sys.argv), "n": n, "threads": args.threads, "forms": {}}
    for form in forms:
        queries = setup.queries(form)
        rows = setup.fact_rows
        per: dict[str, Any] = {}
        for method in methods:
            t = time.perf_counter()
            if method == "bm25":
                index = BM25Index(setup.train["input_ids"], attention_mask=setup.train["attention_mask"])
                scores = torch.as_tensor(
                    index.scores(queries["input_ids"], attention_mask=queries["attention_mask"]), dtype=torch.float64
                )
                extra: dict[str, Any] = {}
            else:
                strategy = "identity" if method == "gradient-dot" else "ekfac"
                if strategy not in fits:
                    fits[strategy] = fitted(setup, task, args.layers, strategy, args.batch_size)
                curv = fits[strategy][0]
                result = inf.scan(
                    setup.model,
                    task,
                    curv,
                    queries,
                    setup.train,
                    keep_scores=True,
                    tokens=False,
                    batch_size=args.batch_size,
                    refine="auto" if method in ("refined", "default") else 0,
                    self_correct=None if method == "default" else False,
                )
                scores = result.scores
                if method == "default":  # rank by the corrected hits, then by the uncorrected scores below them
                    scores = hits_first(result, scores)
                extra = {"inverse": result.meta["inverse"], "refine_plan": result.meta["refine_plan"]}
                fact_scores = [float(scores[q, r]) for q, r in enumerate(rows)]
                extra["median_fact_per_copy"] = float(torch.tensor(fact_scores).median()) / n
            seconds = time.perf_counter() - t
            ranks = ranks_of(scores, rows)
            per[method] = {**metrics(ranks), "seconds": seconds, "ranks": ranks, **extra}
            report(form, method, per[method])
            if args.self_correct and method in ("ekfac", "refined"):
                factors, factor_seconds = self_factors(setup, task, fits["ekfac"][0], extra["inverse"])
                fixed = scores * factors[None, :]
                name = f"{method}+self"
                facts_fixed = [float(fixed[q, r]) for q, r in enumerate(rows)]
                per[name] = {
                    **metrics(ranks_of(fixed, rows)),
                    "seconds": seconds + factor_seconds,
                    "ranks": ranks_of(fixed, rows),
                    "inverse": extra["inverse"],
                    "median_fact_per_copy": float(torch.tensor(facts_fixed).median()) / n,
                }
                report(form, name, per[name])
        results["forms"][form] = per
    results["fit_seconds"] = {k: v[1] for k, v in fits.items()}
    results["layers"] = args.layers
    results["finetune"] = {k: setup.log[k] for k in ("settings", "sequences", "tokens", "mean_logp")}
    out = Path(args.out) / setup.folder.name
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "results.json", results)
    table = render(results)
    (out / "table.md").write_text(table)
    print(table)


def render(results: dict[str, Any]) -> str:
    lines = [
        f"`{results['command']}` — {results['n']} sequences, {len(FACTS)} facts, {results['threads']} threads",
        "",
        "| query form | method | recall@1 | recall@10 | MRR | time (s) | refinement |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for form, per in results["forms"].items():
        for method, r in per.items():
            inv = r.get("inverse") or {}
            how = f"{inv['steps']} CG steps over {inv['data_size']}" if inv.get("inverse") == "refined" else "–"
            lines.append(
                f"| {form} | {method} | {r['recall@1']:.3f} | {r['recall@10']:.3f} | {r['mrr']:.3f} | "
                f"{r['seconds']:.0f} | {how} |"
            )
    fits = ", ".join(f"{k} {v:.0f} s" for k, v in results.get("fit_seconds", {}).items())
    lines.append(f"\nFits (not in the times above): {fits}.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
