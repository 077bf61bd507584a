"""How ``influencer scan`` prints its hits: a table per query (score, per-copy units, the strongest layers) with a
snippet of each hit's text, its most influential tokens bracketed; the split over completion tokens."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from influencer.cli._shared import _say
from influencer.pieces import token_pieces

if TYPE_CHECKING:
    import torch
    from rich.console import Console
    from rich.text import Text

    from influencer.data import Sequences


def _short_layer(name: str, names: Sequence[str]) -> str:
    """``name`` without the dotted prefix all tracked layers share (``model.layers.``)."""
    parts = [n.split(".") for n in names]
    common = 0
    while all(len(p) > common + 1 and p[common] == parts[0][common] for p in parts):
        common += 1
    return ".".join(name.split(".")[common:]) or name


def _snippet(tok: Any, ids: torch.Tensor, tokens: torch.Tensor | None, *, width: int = 140, highlight: int = 3) -> Text:
    """The sequence's text around its most influential token, the top tokens in bold reverse."""
    from rich.text import Text

    pieces = [p.replace("\n", "⏎") for p in token_pieces(tok, ids.tolist())]
    top: set[int] = set()
    center = 0
    if tokens is not None and len(tokens):
        top = set(tokens.topk(min(highlight, len(tokens))).indices.tolist())
        center = int(tokens.argmax())
    lo = hi = center
    used = len(pieces[center]) if pieces else 0
    while (lo > 0 or hi < len(pieces) - 1) and used < width:
        if hi < len(pieces) - 1:
            hi += 1
            used += len(pieces[hi])
        if lo > 0 and (used < width // 3 or hi == len(pieces) - 1):
            lo -= 1
            used += len(pieces[lo])
    text = Text("…" if lo > 0 else "")
    for i in range(lo, hi + 1):
        text.append(pieces[i], style="bold reverse" if i in top else None)
    if hi < len(pieces) - 1:
        text.append("…")
    return text


def _print_hits(
    console: Console,
    tok: Any,
    result: Any,
    queries: list[dict[str, str]],
    seqs: Sequences,
    *,
    show: int,
    per_layer: bool,
    nats: bool,
) -> None:
    from rich.table import Table
    from rich.text import Text

    ids, mask = seqs.batch["input_ids"], seqs.batch["attention_mask"]
    for q, query in enumerate(queries):
        title = Text(f"Query {q + 1} ", style="bold")
        title.append(f"{query['prompt']!r} → {query['completion']!r}", style="default")
        table = Table(title=title, title_justify="left", expand=False, show_lines=False)
        table.add_column("#", justify="right")
        table.add_column("seq", justify="right")
        table.add_column("source", overflow="fold")
        table.add_column("influence", justify="right")
        table.add_column("per copy (nats)" if nats else "per copy (score)", justify="right")
        if per_layer:
            table.add_column("top layers")
        table.add_column("text (top tokens highlighted)", overflow="fold")
        for rank, hit in enumerate(result.top(q, show), 1):
            length = int(mask[hit.index].sum())
            row: list[Any] = [
                str(rank),
                str(hit.index),
                Text(seqs.labels[hit.index]),
                f"{hit.score:.4g}",
                f"{hit.per_copy:+.3g}",
            ]
            if per_layer:
                best = sorted(hit.layers.items(), key=lambda kv: -abs(kv[1]))[:3]
                row.append(Text("\n".join(f"{_short_layer(n, result.layer_names)} {v:+.3g}" for n, v in best)))
            snippet = _snippet(tok, ids[hit.index, :length], hit.tokens)
            if hit.spurious:
                snippet.append("  (spurious: one token dominates)", style="dim")
            row.append(snippet)
            table.add_row(*row)
        console.print(table)
        split = (result.meta.get("completion_split") or {}).get(str(q))
        if split is not None:
            _print_split(console, split, [h.index for h in result.top(q, show)])
        stats = result.stats(q)
        _say(
            console,
            f"  scanned {int(stats['count'])} sequences: mean influence {stats['mean']:.3g}, std {stats['std']:.3g}",
        )


def _print_split(console: Console, data: dict[str, Any], indices: list[int]) -> None:
    """Per completion token: log p and its share of each shown hit's influence."""
    from rich.table import Table

    from influencer.completion import CompletionSplit

    split = CompletionSplit.from_json(0, data)
    shown = [i for i in indices if i in split.hits]
    table = Table(title="  which completion token drives the score", title_justify="left", expand=False)
    table.add_column("completion token")
    table.add_column("log p", justify="right")
    for i in shown:
        table.add_column(f"share of seq {i}", justify="right")
    texts = split.texts or [str(t) for t in split.tokens]
    shares = {i: split.shares(i) for i in shown}
    for c, text in enumerate(texts):
        table.add_row(repr(text), f"{float(split.logp[c]):.3f}", *(f"{float(shares[i][c]):.0%}" for i in shown))
    console.print(table)
