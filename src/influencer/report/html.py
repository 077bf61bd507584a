"""One self-contained HTML page for a scan: per query the prompt and completion, the top (and most negative) hits
with tokenwise heatmaps, layer profiles, the tail plot and tail statistics.

The page works offline: CSS inline, figures as base64 PNG data URIs, no scripts, fonts or other external files.
Every string that comes from data (queries, token strings, texts, notes, layer names) is escaped by jinja2's
autoescape.
"""

from __future__ import annotations

import base64
import datetime as _dt
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from influencer.analysis._optional import require
from influencer.io import atomic_write_text

if TYPE_CHECKING:
    from influencer.analysis.tails import TailStats
    from influencer.scan import Hit, ScanResult

#: hits per query (top positive ones) that also get a layer × token heatmap figure
HEATMAP_HITS = 3
POSITIVE_RGB = (198, 40, 40)
NEGATIVE_RGB = (21, 101, 192)
DPI = 90


def write_report(
    result: ScanResult,
    path: str | os.PathLike,
    *,
    queries: Sequence[Mapping[str, str]],
    train_tokens: Callable[[int], Sequence[str]],
    train_text: Callable[[int], str] | None = None,
    train_source: Callable[[int], str] | None = None,
    title: str = "influencer report",
    top: int = 10,
    notes: Sequence[str] = (),
) -> Path:
    """Render ``result`` as one self-contained HTML file at ``path`` (written atomically); returns its path.

    queries[q]: {"prompt": str, "completion": str} for each of the scan's queries. train_tokens(i): the token
    strings of training sequence i, aligned with ``Hit.tokens`` [T] (truncated to the shorter, with a note, when
    lengths differ). train_text(i): the sequence's text, shown collapsed (and instead of tokens when the scan has
    no token scores). train_source(i): where the sequence comes from (a verse, file:line), shown in the hit's
    header. top: hits shown per query (the positive hits, then the negative ones; a list holds only hits of its
    sign). notes: lines shown at the top. Queries are numbered from 1, as on the command line.
    When ``path`` is an existing directory the page is written as ``path/report.html``.
    """
    if len(queries) < result.n_queries:
        raise ValueError(f"queries: got {len(queries)} prompt/completion pairs for {result.n_queries} scanned queries")
    if top < 1:
        raise ValueError(f"top must be ≥ 1, got {top}")
    for q in range(result.n_queries):
        missing = {"prompt", "completion"} - set(queries[q])
        if missing:
            raise ValueError(f"queries[{q}] lacks {sorted(missing)} (each needs 'prompt' and 'completion')")
    out = Path(path)
    if out.is_dir():
        out = out / "report.html"
    html = render_report(
        result,
        queries=queries,
        train_tokens=train_tokens,
        train_text=train_text,
        train_source=train_source,
        title=title,
        top=top,
        notes=notes,
    )
    atomic_write_text(out, html)
    return out


def render_report(
    result: ScanResult,
    *,
    queries: Sequence[Mapping[str, str]],
    train_tokens: Callable[[int], Sequence[str]],
    train_text: Callable[[int], str] | None = None,
    train_source: Callable[[int], str] | None = None,
    title: str = "influencer report",
    top: int = 10,
    notes: Sequence[str] = (),
) -> str:
    """The page of :func:`write_report` as a string."""
    jinja2 = require("jinja2")
    from influencer.analysis.tails import query_tail_stats
    from influencer.units import calibrated

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("influencer.report", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    full = result.scores  # [Q, N] or None (read once: a run directory keeps it in shards)
    meta = result.meta
    pages = []
    for q in range(result.n_queries):
        row = None if full is None else full[q]
        stats = query_tail_stats(result, q, scores=row)
        texts = _Texts(train_tokens, train_text, train_source)
        pages.append(_query_view(result, q, queries[q], stats, row, texts, top))
    context = {
        "title": title,
        "notes": [str(n) for n in notes],
        "generated": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "prefiltered": bool(meta.get("prefiltered")),
        "summary": _summary(result, full is not None),
        "queries": pages,
        "nats": calibrated(meta.get("inverse"), meta.get("self_correction")),
    }
    return env.get_template("report.html.j2").render(**context)


# --------------------------------------------------------------------------------------------------------
# View models (plain dicts and strings; the template only lays them out)
# --------------------------------------------------------------------------------------------------------


def _num(x: float | None, spec: str = ".4g") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return format(x, spec)


def _png(fig: Any) -> str:
    from influencer.analysis.plots import figure_png

    return "data:image/png;base64," + base64.b64encode(figure_png(fig, dpi=DPI)).decode("ascii")


def _summary(result: ScanResult, full: bool) -> list[tuple[str, str]]:
    from influencer.units import correction_note

    meta = result.meta
    rows = [
        ("queries", str(result.n_queries)),
        ("training sequences scanned", f"{result.n_scanned} of {meta.get('n_dataset', result.n_scanned)}"),
        ("N for per-copy values", str(result.n_train)),
        ("tracked layers", f"{len(result.layer_names)}"),
        ("query rank", "exact" if meta.get("rank") is None else str(meta.get("rank"))),
        ("query refinement", _refinement(meta.get("inverse"))),
        ("leave-one-in correction of the hits", correction_note(meta) or "none"),
        ("full scores kept", "yes" if full else "no (tail statistics from running totals and hits)"),
        ("token scores", "yes" if result.token_scores else "no"),
    ]
    return rows


def _refinement(inverse: Any) -> str:
    from influencer.units import cg_steps

    if not inverse or inverse.get("inverse") != "refined":
        return "none (the curvature's own answer: rank by it, its sizes are a score, not nats; docs/VALIDATION.md §9)"
    return f"{cg_steps(inverse['steps'])} over {inverse['data_size']} training sequences (per-copy values in nats)"


def _token_spans(tokens: Sequence[str], values: Sequence[float]) -> list[dict[str, str]]:
    """One span per token: background red (I_t > 0) or blue (< 0), opacity |I_t| / max_t |I_t|."""
    peak = max((abs(v) for v in values), default=0.0)
    spans = []
    for pos, (text, v) in enumerate(zip(tokens, values, strict=False)):
        a = abs(v) / peak if peak > 0 else 0.0
        r, g, b = POSITIVE_RGB if v > 0 else NEGATIVE_RGB
        style = f"background-color: rgba({r}, {g}, {b}, {a:.3f})" + ("; color: #fff" if a > 0.6 else "")
        spans.append(
            {"text": text if text != "" else "\u2205", "style": style, "title": f"I_t = {v:+.4g} (position {pos})"}
        )
    return spans


@dataclass(frozen=True)
class _Texts:
    """How the page reads a training sequence: its token strings, its text, its source (see write_report)."""

    tokens: Callable[[int], Sequence[str]]
    text: Callable[[int], str] | None = None
    source: Callable[[int], str] | None = None


def _hit_view(result: ScanResult, hit: Hit, rank: int, texts: _Texts, heatmap: bool) -> dict[str, Any]:
    train_tokens, train_text = texts.tokens, texts.text
    spurious = hit.spurious
    view: dict[str, Any] = {
        "rank": rank,
        "index": hit.index,
        "score": _num(hit.score),
        "per_copy": _num(hit.per_copy, ".3e"),
        "positive": hit.score > 0,
        "spurious": "n/a" if spurious is None else ("yes" if spurious else "no"),
        "is_spurious": bool(spurious),
        "tokens": None,
        "plain": None,
        "note": None,
        "heatmap": None,
        "text": None if train_text is None else str(train_text(hit.index)),
        "source": None if texts.source is None else str(texts.source(hit.index)),
    }
    strings = [str(t) for t in train_tokens(hit.index)]
    if hit.tokens is None:
        view["plain"] = view["text"] if view["text"] is not None else "".join(strings)
        view["note"] = "no token scores (the scan ran with tokens=False): plain text"
        return view
    values = [float(v) for v in hit.tokens.tolist()]
    if len(strings) != len(values):
        m = min(len(strings), len(values))
        view["note"] = f"{len(strings)} token strings but {len(values)} token scores: showing the first {m} of each"
        strings, values = strings[:m], values[:m]
    view["tokens"] = _token_spans(strings, values)
    if heatmap and hit.layer_tokens is not None:
        from influencer.analysis.plots import plot_layer_tokens

        fig = plot_layer_tokens(hit, result.layer_names, strings, title=f"#{hit.index}: layer × token influence")
        view["heatmap"] = _png(fig)
    return view


def _tail_view(stats: TailStats, n_train: int, prefiltered: bool) -> dict[str, Any]:
    plural = "" if stats.top_count == 1 else "s"
    rows = [
        ("scored sequences", str(stats.n)),
        ("Σ I", _num(stats.total)),
        ("Σ max(I, 0) (positive total)", _num(stats.positive_total)),
        (
            f"share of the positive total held by the top {stats.top_fraction:.0%} "
            f"({stats.top_count} sequence{plural})",
            "–" if stats.top_share is None else f"{stats.top_share:.1%}",
        ),
    ]
    fit = stats.fit
    comparisons = []
    if fit is not None:
        rows += [
            ("power-law exponent α (p(I) ∝ I^−α)", f"{fit.alpha:.3f} ± {fit.sigma:.3f}"),
            (
                "xmin ("
                + {"fitted": "KS-optimal", "given": "given", "hits": "smallest kept hit"}.get(
                    fit.xmin_source, fit.xmin_source
                )
                + ")",
                _num(fit.xmin),
            ),
            ("sequences in the tail", f"{fit.n_tail} ({fit.tail_rate:.2%} of scored)"),
            ("KS distance D", _num(fit.ks, ".3f")),
        ]
        size = stats.scan_size()
        if size is not None:
            rows.append(("sequences to scan to meet a hit as influential as the top one (50 %)", _num(size, ".3g")))
        if n_train > stats.n:
            top_n = fit.top_score(n_train)
            rows.append((f"median top score if all N = {n_train} sequences were scanned", _num(top_n)))
        half = stats.fraction_holding(0.5)
        rows.append(
            (
                "top fraction of sequences holding half the positive influence (model)",
                "– (needs α > 2 and a tail holding ≥ 50 %)" if half is None else f"{half:.3%}",
            )
        )
        for c in fit.comparisons.values():
            comparisons.append(
                {
                    "alternative": c.alternative.replace("_", " "),
                    "ratio": _num(c.ratio, ".3g"),
                    "p": _num(c.p, ".3g"),
                    "favours": c.favours.replace("_", " "),
                }
            )
    notes = list(stats.notes)
    if prefiltered and fit is not None:
        notes.append("scan-size estimates assume uniformly drawn sequences; the prefiltered candidates are not")
    return {"rows": rows, "comparisons": comparisons, "reason": stats.reason, "notes": notes, "source": stats.source}


def _query_view(
    result: ScanResult,
    q: int,
    query: Mapping[str, str],
    stats: TailStats,
    row: Any,
    texts: _Texts,
    top: int,
) -> dict[str, Any]:
    from influencer.analysis.plots import plot_layer_profile, plot_tail

    # each list holds hits of its sign only (with few candidates the top positive hits may include negatives)
    hits = [h for h in result.top(q, top) if h.score > 0]
    negative = [h for h in result.top(q, top, negative=True) if h.score < 0]
    running = result.stats(q)
    view: dict[str, Any] = {
        "index": q,
        "number": q + 1,
        "prompt": str(query["prompt"]),
        "completion": str(query["completion"]),
        "totals": [
            ("count", _num(running["count"], ".0f")),
            ("sum", _num(running["sum"])),
            ("mean", _num(running["mean"])),
            ("std", _num(running["std"])),
            ("positive sum", _num(running["positive_sum"])),
        ],
        "tail": _tail_view(stats, result.n_train, bool(result.meta.get("prefiltered"))),
        "tail_plot": None,
        "layer_plot": _png(
            plot_layer_profile(hits, result.layer_names, title=f"query {q + 1}: layer profile of the top hits")
        )
        if hits
        else None,
        "hits": [_hit_view(result, h, r + 1, texts, r < HEATMAP_HITS) for r, h in enumerate(hits)],
        "negative": [_hit_view(result, h, r + 1, texts, False) for r, h in enumerate(negative)],
    }
    if row is not None:
        view["tail_plot"] = _png(plot_tail(row, stats.fit, title=f"query {q + 1}: sorted influence"))
    view["completion_split"] = _completion_view(result, q, [h.index for h in hits][:HEATMAP_HITS])
    return view


def _completion_view(result: ScanResult, q: int, indices: list[int]) -> dict[str, Any] | None:
    """Rows (token, log p, share of each top hit's influence) when the scan split its completion."""
    from influencer.completion import CompletionSplit

    data = (result.meta.get("completion_split") or {}).get(str(q))
    if data is None:
        return None
    split = CompletionSplit.from_json(q, data)
    shown = [i for i in indices if i in split.hits]
    texts = split.texts or [f"token {t}" for t in split.tokens]
    shares = {i: split.shares(i).tolist() for i in shown}
    rows = [
        {"text": texts[c], "logp": _num(float(split.logp[c]), ".3f"), "shares": [f"{shares[i][c]:.0%}" for i in shown]}
        for c in range(len(split.positions))
    ]
    return {"hits": shown, "rows": rows}
