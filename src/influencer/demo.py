"""End-to-end demo: influence on the built-in SmolLM2-135M-Instruct (de-quantized from a 4-bit GGUF) over King
James verses, on the default (refined) path.

Run with ``make demo`` or ``python -m influencer.demo [--fit N] [--verses N] [--refine auto|N] [--layers …]``.
Fits EK-FAC on the first verses of Genesis (+ a few famous ones), scans the first ``--verses`` verses of the Bible
(+ the famous ones) without a prefilter, with the queries refined on the full Gauss-Newton matrix over a sample
of them (the default of ``scan``), and prints, for a few built-in queries, the verses whose addition would most
increase log p(completion | prompt) with per-copy values in nats, where each query's source verse ranks (also
for a paraphrase), and which completion token drives the "Paris." query; writes ``report.html``.
"""

from __future__ import annotations

import argparse
import textwrap
import time
from pathlib import Path
from typing import Any

import torch

import influencer as inf
from influencer.data import kjv_verses, tokenize_queries, tokenize_texts
from influencer.models import load_model
from influencer.pieces import token_pieces
from influencer.units import calibrated, cg_steps, correction_note, units_note

DEFAULT_LAYERS = r"model\.layers\.[0-5]\.mlp\."
MODEL_NAME = "SmolLM2-135M-Instruct (de-quantized from a 4-bit GGUF)"

#: famous verses added to the fitted and scanned verses (by citation) so that the queries below have a source
FAMOUS = ("John 3:16", "Psalms 23:1", "Ecclesiastes 1:9")

QUERIES = (
    # (prompt, completion, the citation it comes from or None)
    ("In the beginning God created", " the heaven and the earth.", "Genesis 1:1"),
    (
        "For God so loved the world, that he gave his only begotten Son,",
        " that whosoever believeth in him should not perish, but have everlasting life.",
        "John 3:16",
    ),
    ("The LORD is my shepherd;", " I shall not want.", "Psalms 23:1"),
    ("At the very start, God made", " the sky and the land.", "Genesis 1:1"),  # a paraphrase of Genesis 1:1
    ("The capital of France is", " Paris.", None),
)


def _corpus(n: int) -> list[dict[str, str]]:
    verses = kjv_verses(n)
    wanted = set(FAMOUS) - {v["citation"] for v in verses}
    if wanted:
        verses += [v for v in kjv_verses() if v["citation"] in wanted]
    return verses


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fit", type=int, default=128, help="fit on the first N verses of Genesis (+ famous ones)")
    parser.add_argument(
        "--verses", type=int, default=768, help="scan the first N verses of the Bible (+ famous ones), unfiltered"
    )
    parser.add_argument(
        "--layers",
        default=DEFAULT_LAYERS,
        help="layer preset or regex (default: the MLPs of blocks 0-5; 'mlp' for all 30 blocks)",
    )
    parser.add_argument("--rank", type=int, default=32, help="rank of the stored queries")
    parser.add_argument("--strategy", default="ekfac", choices=inf.STRATEGIES)
    parser.add_argument(
        "--refine", default="auto", help="'auto' (the default path), N CG steps, or 0 for the paper's plain EK-FAC"
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--top", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument(
        "--out", default="runs/demo", help="folder for report.html (written when influencer.report is available)"
    )
    args = parser.parse_args(argv)
    refine = args.refine if args.refine == "auto" else int(args.refine)
    if args.threads:
        torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    model, tok = load_model("smollm2-135m")
    verses = _corpus(args.verses)
    train = tokenize_texts(tok, [v["text"] for v in verses])
    fit_rows = _corpus(args.fit)
    fit_train = tokenize_texts(tok, [v["text"] for v in fit_rows])
    task = inf.CausalLM(pad_token_id=tok.pad_token_id)
    print(
        f"{MODEL_NAME} loaded in {time.perf_counter() - t0:.1f}s; fitting on {len(fit_rows)} verses, "
        f"{int(fit_train['attention_mask'].sum())} tokens"
    )

    t1 = time.perf_counter()
    curv = inf.fit_curvature(
        model, task, fit_train, strategy=args.strategy, layers=args.layers, batch_size=args.batch_size
    )
    curv.n_train = len(verses)  # per-copy units: one copy added to the scanned corpus
    print(
        f"fitted {args.strategy} on {len(curv.layers)} layers in {time.perf_counter() - t1:.1f}s "
        f"(factors {curv.nbytes() / 2**20:.0f} MiB)"
    )

    prompts, completions, _sources = zip(*QUERIES, strict=True)
    queries = tokenize_queries(tok, list(prompts), list(completions))
    t3 = time.perf_counter()
    result = inf.scan(
        model,
        task,
        curv,
        queries,
        train,
        rank=args.rank,
        top_k=args.top,
        batch_size=args.batch_size,
        keep_scores=True,
        refine=refine,
    )
    inverse = result.meta["inverse"]
    plan = result.meta["refine_plan"]
    how = (
        f"refined by {cg_steps(inverse['steps'])} over {inverse['data_size']} sampled verses "
        f"(predicted {100 * plan['predicted']:.0f}% of the scan's cost)"
        if inverse["inverse"] == "refined"
        else "plain curvature, not refined"
    )
    print(
        f"scanned {len(prompts)} queries × {result.n_scanned} verses, unfiltered, in {time.perf_counter() - t3:.1f}s; "
        f"queries {how}\n"
    )

    citations = [v["citation"] for v in verses]
    scores = result.scores
    assert scores is not None
    unit = "nats" if calibrated(inverse, result.meta.get("self_correction")) else "(score)"
    for q, (prompt, completion, source) in enumerate(QUERIES):
        print(f"Query {q + 1}: {prompt!r} → {completion!r}")
        for rank, hit in enumerate(result.top(q, args.top), 1):
            print(f"  {rank}. {citations[hit.index]:<18} I = {hit.score:11.4g}  per copy = {hit.per_copy:+.3g} {unit}")
            print(f"     {_highlight(tok, train['input_ids'][hit.index], hit.tokens)}")
        if source is not None:
            print("  " + _source_rank(result, q, citations.index(source), source, scores))
        print()
    paris = len(QUERIES) - 1
    _print_completion_split(model, task, result, curv, queries, train, paris, tok, citations, refine)
    note = units_note(inverse, result.n_train, result.meta.get("self_correction"))
    print(textwrap.fill(note, 110, break_on_hyphens=False))
    if (note := correction_note(result.meta)) is not None:
        print(textwrap.fill(note, 110, break_on_hyphens=False))
    print("[brackets] mark the 3 tokens with the largest tokenwise influence (the token before a predicted one).")
    report = _write_report(
        result, tok, train, verses, Path(args.out) / "report.html", top=args.top, n_fit=len(fit_rows)
    )
    if report is not None:
        print(f"report: {report}")
    print(f"total {time.perf_counter() - t0:.1f}s")


def _print_completion_split(
    model: Any,
    task: inf.CausalLM,
    result: inf.ScanResult,
    curv: inf.Curvature,
    queries: dict[str, torch.Tensor],
    train: dict[str, torch.Tensor],
    q: int,
    tok: Any,
    citations: list[str],
    refine: Any,
) -> None:
    """Which completion token drives query q's top hit (the "Paris." trap)."""
    from influencer.completion import completion_split
    from influencer.refine import RefinedInverse
    from influencer.tasks import take_rows

    top = result.top(q, 1)
    if not top:
        return
    inverse: Any = curv
    meta = result.meta["inverse"]
    if meta["inverse"] == "refined":  # the scan's own inverse: the same steps over the same seeded sample
        from influencer.refine_plan import sample_rows

        rows = sample_rows(meta["sample_of"], meta["data_size"], meta["seed"])
        inverse = RefinedInverse(model, task, curv, take_rows(train, rows), steps=meta["steps"])
    (split,) = completion_split(model, task, inverse, take_rows(queries, [q]), train, {0: [top[0].index]})
    shares = split.shares(top[0].index)
    parts = ", ".join(
        f"{tok.decode([t])!r} {100 * float(s):.0f}% (log p {float(lp):.2f})"
        for t, s, lp in zip(split.tokens, shares, split.logp, strict=True)
    )
    print(f"Which completion token drives query {q + 1}'s top hit ({citations[top[0].index]}): {parts}")
    print()


def _source_rank(result: inf.ScanResult, q: int, i: int, source: str, scores: torch.Tensor) -> str:
    """Where the query's source verse ranks among all scanned verses (among the corrected hits when it is one)."""
    hits = [h.index for h in result.top(q)]
    if i in hits:
        return f"source verse {source} ranks #{hits.index(i) + 1} of the {scores.shape[1]} verses scanned"
    rank = int((scores[q] > scores[q, i]).sum()) + 1
    return f"source verse {source} is not among the top {len(hits)}; it ranks #{rank} by the uncorrected scores"


def _write_report(
    result: inf.ScanResult,
    tok: Any,
    train: dict[str, torch.Tensor],
    verses: list[dict[str, str]],
    path: Path,
    *,
    top: int,
    n_fit: int,
) -> Path | None:
    """report.html via influencer.report when that module is available (None otherwise)."""
    try:
        from influencer.report import write_report
    except ModuleNotFoundError as exc:
        if exc.name != "influencer.report":
            raise
        return None
    ids, mask = train["input_ids"], train["attention_mask"]

    def train_tokens(i: int) -> list[str]:
        return token_pieces(tok, ids[i, : int(mask[i].sum())].tolist())

    def train_text(i: int) -> str:
        return str(verses[i]["text"])

    queries = [{"prompt": p, "completion": c} for p, c, _ in QUERIES]
    notes = [
        f"{MODEL_NAME}; EK-FAC on {len(result.layer_names)} MLP layers fitted on {n_fit} verses; "
        f"{result.n_scanned} King James verses scanned, unfiltered"
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_report(
        result,
        path,
        queries=queries,
        train_tokens=train_tokens,
        train_text=train_text,
        train_source=lambda i: str(verses[i]["citation"]),
        title="influencer demo: SmolLM2-135M-Instruct × King James verses",
        top=top,
        notes=notes,
    )


def _highlight(tok: object, ids: torch.Tensor, tokens: torch.Tensor | None, n: int = 3, width: int = 110) -> str:
    """The verse text with its n most influential tokens in [brackets]."""
    if tokens is None:
        return ""
    top = set(torch.topk(tokens, min(n, len(tokens))).indices.tolist())
    pieces = token_pieces(tok, ids[: len(tokens)].tolist())  # type: ignore[attr-defined]
    text = "".join(f"[{p}]" if i in top else p for i, p in enumerate(pieces))
    return text if len(text) <= width else text[: width - 1] + "…"


if __name__ == "__main__":
    main()
