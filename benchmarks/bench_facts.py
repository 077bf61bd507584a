"""Fact tracing on a fine-tuned SmolLM2: does influence find the one training sentence that taught a fact?

The model is SmolLM2-135M-Instruct (de-quantized from a 4-bit GGUF) fine-tuned on KJV verses plus 48 planted facts
about invented entities, each stated once, and two distractors per fact that mention its subject without the
fact (``factkit.py``). For each fact and each query form — its own wording, a paraphrase (paper §5.3.1) and the
reversed order (§5.3.4) — every method ranks the whole corpus (no prefilter) and we record where the fact's own
sentence lands: recall@1, recall@10, mean reciprocal rank, and the time of each method (fit excluded, shown apart).

Methods: BM25 (the paper's prefilter scoring of prompt + completion), gradient dot products (identity), the
paper's plain EK-FAC (``scan(..., refine=0)``), the refined queries alone (the uncorrected scores of the default
scan: EK-FAC refined within the cost model's budget) and the default path (``scan(...)``: refined, and the kept
hits corrected for their own curvature among a pool of 3 × top_k; it is ranked by its hits, then the rest; one
scan gives both rows, timed once). With
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


def self_factors(setup: Any, task: inf.CausalLM, curv: inf.Curvature) -> tuple[torch.Tensor, float]:
    """Leave-one-in factors 1 / (1 + c s / N) of every corpus sequence (c s cached in the setup folder): they
    restore each sequence's own curvature, as ``influencer.self_curvature.hit_factors`` does for a scan's hits."""
    from safetensors.torch import load_file, save_file

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
    factor = 1.0 / (1.0 + cs / n)  # as influencer.self_curvature.hit_factors, sample members included
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
    run_info = {"command": None, "threads": args.threads, "date": time.strftime("%Y-%m-%d")}
    task = inf.CausalLM(pad_token_id=setup.tokenizer.pad_token_id)
    n = len(setup.docs)
    print(f"corpus: {n} sequences ({int(setup.train['attention_mask'].sum())} tokens); model {setup.folder}")
    fits: dict[str, tuple[inf.Curvature, float]] = {}
    measured: set[tuple[str, str]] = set()  # the (form, method) rows this run wrote; others on disk are kept
    out = Path(args.out) / setup.folder.name
    previous = out / "results.json"  # rows of earlier runs on this model are kept unless this run redoes them
    results: dict[str, Any] = json.loads(previous.read_text()) if previous.is_file() else {"forms": {}}
    if results.get("layers", args.layers) != args.layers:
        results = {"forms": {}}
    run_info["command"] = " ".join(["python", *sys.argv])
    results.update(n=n, layers=args.layers)
    results["finetune"] = {k: setup.log[k] for k in ("settings", "sequences", "tokens", "mean_logp")}
    for form in forms:
        queries = setup.queries(form)
        rows = setup.fact_rows
        per: dict[str, Any] = results["forms"].setdefault(form, {})
        scans: dict[tuple[str, bool], tuple[inf.ScanResult, float]] = {}
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
                refine = method in ("refined", "default")
                key = (strategy, refine)
                if key in scans:  # 'refined' and 'default' read one default scan (its scores are uncorrected)
                    result, t = scans[key]
                else:
                    result = inf.scan(
                        setup.model,
                        task,
                        curv,
                        queries,
                        setup.train,
                        keep_scores=True,
                        tokens=False,
                        batch_size=args.batch_size,
                        refine="auto" if refine else 0,
                        self_correct=None if refine else False,
                    )
                    scans[key] = (result, t)
                scores = result.scores
                if method == "default":  # rank by the corrected hits, then by the uncorrected scores below them
                    scores = hits_first(result, scores)
                extra = {
                    "inverse": result.meta["inverse"],
                    "refine_plan": result.meta["refine_plan"],
                    "self_correction": {
                        k: v for k, v in (result.meta.get("self_correction") or {}).items() if k != "factors"
                    },
                }
                fact_scores = [float(result.scores[q, r]) for q, r in enumerate(rows)]
                if method == "default":  # a kept hit is reported with its corrected score
                    for q, r in enumerate(rows):
                        fact_scores[q] = next((h.score for h in result.top(q) if h.index == r), fact_scores[q])
                extra["median_fact_per_copy"] = float(torch.tensor(fact_scores).median()) / n
            seconds = time.perf_counter() - t
            ranks = ranks_of(scores, rows)
            per[method] = {**metrics(ranks), "seconds": seconds, "ranks": ranks, **extra, **run_info}
            report(form, method, per[method])
            measured.add((form, method))
            if args.self_correct and method in ("ekfac", "refined"):
                factors, factor_seconds = self_factors(setup, task, fits["ekfac"][0])
                fixed = scores * factors[None, :]
                name = f"{method}+self"
                facts_fixed = [float(fixed[q, r]) for q, r in enumerate(rows)]
                per[name] = {
                    **metrics(ranks_of(fixed, rows)),
                    "seconds": seconds + factor_seconds,
                    "ranks": ranks_of(fixed, rows),
                    "inverse": extra["inverse"],
                    "median_fact_per_copy": float(torch.tensor(facts_fixed).median()) / n,
                    **run_info,
                }
                report(form, name, per[name])
                measured.add((form, name))
            results.setdefault("fit_seconds", {}).update({k: v[1] for k, v in fits.items()})
            save(out, results, measured)  # after every row: a long run keeps what it measured
    print(render(results))


def save(out: Path, results: dict[str, Any], measured: set[tuple[str, str]] | None = None) -> None:
    """Write results; rows another run wrote to the file meanwhile are kept (only ``measured`` rows are ours)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    if measured is not None and path.is_file():
        on_disk = json.loads(path.read_text())
        if on_disk.get("layers") == results.get("layers"):
            for form, rows in on_disk.get("forms", {}).items():
                for method, row in rows.items():
                    if (form, method) not in measured:
                        results["forms"].setdefault(form, {})[method] = row
            for key, seconds in on_disk.get("fit_seconds", {}).items():
                results.setdefault("fit_seconds", {}).setdefault(key, seconds)
    atomic_write_json(path, results)
    (out / "table.md").write_text(render(results))


def render(results: dict[str, Any]) -> str:
    lines = [
        f"{results['n']} sequences, {len(FACTS)} facts; each row made by the command numbered beside it",
        "",
        "| query form | method | recall@1 | recall@10 | MRR | time (s) | refinement | fact per copy (median) | run |",
        "|---|---|---:|---:|---:|---:|---|---:|---|",
    ]
    runs: list[tuple[str, int]] = []
    for form, per in results["forms"].items():
        for method, r in per.items():
            inv = r.get("inverse") or {}
            how = f"{inv['steps']} CG steps over {inv['data_size']}" if inv.get("inverse") == "refined" else "–"
            run = (str(r.get("command")), int(r.get("threads", 0)))
            if run not in runs:
                runs.append(run)
            fact = f"{r['median_fact_per_copy']:.3g}" if "median_fact_per_copy" in r else "–"
            lines.append(
                f"| {form} | {method} | {r['recall@1']:.3f} | {r['recall@10']:.3f} | {r['mrr']:.3f} | "
                f"{r['seconds']:.0f} | {how} | {fact} | {runs.index(run) + 1} |"
            )
    lines.append("")
    lines += [f"{i + 1}. `{cmd}` ({threads} threads)" for i, (cmd, threads) in enumerate(runs)]
    fits = ", ".join(f"{k} {v:.0f} s" for k, v in results.get("fit_seconds", {}).items())
    lines.append(f"\nFits (not in the times above): {fits}.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
