"""End-to-end demo: EK-FAC influence on the built-in SmolLM2-135M over the King James Bible.

Run with ``make demo`` or ``python -m influencer.demo [--verses N] [--candidates N] [--layers PRESET|REGEX]``.
Fits the curvature on the first verses of Genesis (+ a few famous ones), narrows the whole Bible (31,103 verses)
to each query's BM25 candidates (paper §3.2.1), scans them, and prints, for a few built-in queries, the verses
whose addition would most increase log p(completion | prompt); writes ``report.html``.
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
from influencer.refine import UNREFINED_SCALE_NOTE

DEFAULT_LAYERS = r"model\.layers\.[0-5]\.mlp\."

#: famous verses added to the fitting set (by citation) so that the queries below have a source to find
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
    ("At the very start, God made", " the sky and the land.", None),
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
    parser.add_argument(
        "--verses", type=int, default=96, help="fit on the first N verses of Genesis (+ a few famous ones)"
    )
    parser.add_argument(
        "--candidates",
        type=int,
        default=24,
        help="BM25 candidates per query from the whole Bible (0: scan the fitting verses only)",
    )
    parser.add_argument(
        "--layers",
        default=DEFAULT_LAYERS,
        help="layer preset or regex (default: the MLPs of blocks 0-5; 'mlp' for all 30 blocks)",
    )
    parser.add_argument("--rank", type=int, default=32, help="rank of the stored queries")
    parser.add_argument("--strategy", default="ekfac", choices=inf.STRATEGIES)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--top", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument(
        "--out", default="runs/demo", help="folder for report.html (written when influencer.report is available)"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    model, tok = load_model("smollm2-135m")
    verses = _corpus(args.verses)
    texts = [v["text"] for v in verses]
    train = tokenize_texts(tok, texts)
    task = inf.CausalLM(pad_token_id=tok.pad_token_id)
    print(
        f"SmolLM2-135M loaded in {time.perf_counter() - t0:.1f}s; fitting on {len(texts)} verses, "
        f"{int(train['attention_mask'].sum())} tokens"
    )

    t1 = time.perf_counter()
    curv = inf.fit_curvature(model, task, train, strategy=args.strategy, layers=args.layers, batch_size=args.batch_size)
    print(
        f"fitted {args.strategy} on {len(curv.layers)} layers in {time.perf_counter() - t1:.1f}s "
        f"(factors {curv.nbytes() / 2**20:.0f} MiB)"
    )

    prompts, completions, _sources = zip(*QUERIES, strict=True)
    queries = tokenize_queries(tok, list(prompts), list(completions))
    candidates = None
    if args.candidates > 0:  # the corpus is the whole Bible, narrowed per query by BM25
        from influencer.prefilter import BM25Index

        t2 = time.perf_counter()
        verses = kjv_verses()
        train = tokenize_texts(tok, [v["text"] for v in verses])
        index = BM25Index(
            train["input_ids"],
            attention_mask=train["attention_mask"],
            ignore_ids=[tok.pad_token_id] if tok.pad_token_id is not None else (),
        )
        union, candidates = index.candidates(
            queries["input_ids"], args.candidates, attention_mask=queries["attention_mask"], per_query=True
        )
        print(
            f"BM25 prefilter: {args.candidates} candidates per query from {len(verses)} verses, "
            f"{len(union)} distinct, in {time.perf_counter() - t2:.1f}s"
        )
    t3 = time.perf_counter()
    result = inf.scan(
        model,
        task,
        curv,
        queries,
        train,
        rank=args.rank,
        top_k=max(args.top, 5),
        batch_size=args.batch_size,
        keep_scores=True,
        candidates=candidates,
        n_train=len(verses),
    )
    print(
        f"scanned {len(prompts)} queries × {result.n_scanned} verses in {time.perf_counter() - t3:.1f}s "
        f"({result.meta['store']})\n"
    )

    citations = [v["citation"] for v in verses]
    scores = result.scores
    assert scores is not None
    for q, (prompt, completion, source) in enumerate(QUERIES):
        print(f"Query {q + 1}: {prompt!r} → {completion!r}")
        for rank, hit in enumerate(result.top(q, args.top), 1):
            print(f"  {rank}. {citations[hit.index]:<18} I = {hit.score:11.2f}  per copy = {hit.per_copy:+.3g} nats")
            print(f"     {_highlight(tok, train['input_ids'][hit.index], hit.tokens)}")
        if source is not None:
            print("  " + _source_rank(q, citations.index(source), source, scores, candidates))
        print()
    print("Per copy = I / N: the predicted change of log p(completion) from adding one copy of the verse to an")
    print(f"N = {len(verses)}-verse training set.")
    if args.strategy != "identity":
        print(textwrap.fill(UNREFINED_SCALE_NOTE, 110, break_on_hyphens=False))
    print("[brackets] mark the 3 tokens with the largest tokenwise influence (the token before a predicted one).")
    report = _write_report(
        result, tok, train, verses, Path(args.out) / "report.html", top=max(args.top, 5), n_fit=len(texts)
    )
    if report is not None:
        print(f"report: {report}")
    print(f"total {time.perf_counter() - t0:.1f}s")


def _source_rank(q: int, i: int, source: str, scores: torch.Tensor, candidates: torch.Tensor | None) -> str:
    """Where the query's source verse ranks among the verses scanned for that query."""
    scanned = torch.arange(scores.shape[1]) if candidates is None else candidates[q]
    if i not in set(scanned.tolist()):
        return f"source verse {source} is not among this query's {len(scanned)} BM25 candidates"
    rank = int((scores[q, scanned] > scores[q, i]).sum()) + 1
    return f"source verse {source} ranks #{rank} of the {len(scanned)} verses scanned for this query"


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
        return [tok.decode([int(t)]) for t in ids[i, : int(mask[i].sum())]]

    def train_text(i: int) -> str:
        return f"{verses[i]['citation']}: {verses[i]['text']}"

    queries = [{"prompt": p, "completion": c} for p, c, _ in QUERIES]
    notes = [
        f"SmolLM2-135M; EK-FAC on {len(result.layer_names)} MLP layers fitted on {n_fit} verses; "
        f"{result.n_scanned} of the {len(verses)} King James verses scanned"
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_report(
        result,
        path,
        queries=queries,
        train_tokens=train_tokens,
        train_text=train_text,
        title="influencer demo: SmolLM2-135M × King James verses",
        top=top,
        notes=notes,
    )


def _highlight(tok: object, ids: torch.Tensor, tokens: torch.Tensor | None, n: int = 3, width: int = 110) -> str:
    """The verse text with its n most influential tokens in [brackets]."""
    if tokens is None:
        return ""
    top = set(torch.topk(tokens, min(n, len(tokens))).indices.tolist())
    pieces = [tok.decode([int(t)]) for t in ids[: len(tokens)]]  # type: ignore[attr-defined]
    text = "".join(f"[{p}]" if i in top else p for i, p in enumerate(pieces))
    return text if len(text) <= width else text[: width - 1] + "…"


if __name__ == "__main__":
    main()
