"""Word-order probe (paper §5.3.4): does a training sequence help a query more when the prompt-side phrase comes
before the completion-side phrase than after it?

From a fact given as (prompt, completion) the probe writes synthetic training sequences in five conditions, each
in the same neutral frames (a filler sentence before and after):

- ``prompt→completion``: the prompt-side phrase, then the completion-side phrase (the query's own order);
- ``completion→prompt``: the same two phrases, completion side first;
- ``completion only``, ``prompt only``: one of the phrases alone (controls);
- ``neither``: the frame alone (the baseline of the frames themselves).

It scores every sequence against the query with the given inverse (an influence on the query's log p) and reports
each condition's mean influence and the ratio prompt→completion / completion→prompt. Grosse et al. found that
on their models the influence of the reversed order is near zero: models learn "A is B", not "B is A".

    result = word_order_probe(model, task, inverse, tokenizer, "The capital of Zorvania is", " Quellmoor")
    print(result.table())
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from influencer.curvature.core import Inverse
from influencer.scores import pairwise_scores
from influencer.tasks import Task

__all__ = ["CONDITIONS", "FRAMES", "ProbeResult", "probe_sequences", "word_order_probe"]

CONDITIONS = ("prompt→completion", "completion→prompt", "completion only", "prompt only", "neither")

#: neutral filler sentences placed before and after the phrases (one synthetic sequence per frame)
FRAMES: tuple[tuple[str, str], ...] = (
    ("Here is a note.", "That is all."),
    ("The clerk wrote it down.", "The page was filed."),
    ("Read the following line.", "Then close the book."),
    ("A traveller once said this.", "Nobody argued."),
    ("From the old records:", "End of the entry."),
    ("It was mentioned at dinner.", "The talk moved on."),
)


@dataclass
class ProbeResult:
    """Influences of the synthetic sequences on the query, per condition.

    sequences[condition]: the texts; influence[condition]: their influences (raw scores I, same order);
    per_copy: influence / n_train; nats: whether per-copy values are calibrated nats (never here: the synthetic
    sequences are not corrected for their own curvature, so compare the orders by their ratio).
    """

    prompt: str
    completion: str
    prompt_phrase: str
    completion_phrase: str
    sequences: dict[str, list[str]]
    influence: dict[str, list[float]]
    n_train: int
    nats: bool
    inverse: dict[str, Any] = field(default_factory=dict)

    def mean(self, condition: str) -> float:
        return statistics.fmean(self.influence[condition])

    @property
    def ratio(self) -> float:
        """Mean influence of prompt→completion over that of completion→prompt (inf when the latter is 0)."""
        after = self.mean("completion→prompt")
        return self.mean("prompt→completion") / after if after != 0 else float("inf")

    def table(self) -> str:
        """A Markdown table: condition, mean and range of the influence, mean per copy."""
        unit = "nats" if self.nats else "score"
        rows = [f"| condition | mean influence | min | max | mean per copy ({unit}) |", "|---|---:|---:|---:|---:|"]
        for c in CONDITIONS:
            v = self.influence[c]
            rows.append(
                f"| {c} | {statistics.fmean(v):.4g} | {min(v):.4g} | {max(v):.4g} | "
                f"{statistics.fmean(v) / self.n_train:+.3g} |"
            )
        rows.append(f"\nratio prompt→completion / completion→prompt: **{self.ratio:.3g}**")
        return "\n".join(rows)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": self.ratio, "means": {c: self.mean(c) for c in CONDITIONS}}


def probe_sequences(
    prompt_phrase: str, completion_phrase: str, frames: tuple[tuple[str, str], ...] = FRAMES
) -> dict[str, list[str]]:
    """The synthetic training texts of each condition (one per frame)."""
    p, c = prompt_phrase.strip(), completion_phrase.strip()
    if not p or not c:
        raise ValueError("the probe needs a non-empty prompt-side and completion-side phrase")
    body = {
        "prompt→completion": f"{p} {c}.",
        "completion→prompt": f"{c}. {p}",
        "completion only": f"{c}.",
        "prompt only": p,
        "neither": "",
    }
    return {cond: [" ".join(x for x in (before, body[cond], after) if x) for before, after in frames] for cond in body}


def word_order_probe(
    model: nn.Module,
    task: Task,
    inverse: Inverse,
    tokenizer: Any,
    prompt: str,
    completion: str,
    *,
    prompt_phrase: str | None = None,
    completion_phrase: str | None = None,
    frames: tuple[tuple[str, str], ...] = FRAMES,
    n_train: int | None = None,
    batch_size: int = 16,
) -> ProbeResult:
    """Score the probe's synthetic sequences against the query (prompt, completion) with ``inverse``.

    prompt_phrase / completion_phrase: the phrases placed in the sequences (default: the prompt and the
    completion themselves). n_train: N for per-copy values (default: the curvature's). Returns a
    :class:`ProbeResult`; its ``nats`` says whether per-copy values are calibrated (see :mod:`influencer.units`).
    """
    from influencer.data import tokenize_queries, tokenize_texts
    from influencer.units import calibrated

    if not completion.strip():
        raise ValueError("the query's completion is empty; a query measures log p(completion | prompt)")
    p_phrase = prompt if prompt_phrase is None else prompt_phrase
    c_phrase = completion if completion_phrase is None else completion_phrase
    texts = probe_sequences(p_phrase, c_phrase, frames)
    flat = [t for cond in CONDITIONS for t in texts[cond]]
    train = tokenize_texts(tokenizer, flat)
    query = tokenize_queries(tokenizer, [prompt], [completion])
    scores = pairwise_scores(model, task, inverse, query, train, batch_size=batch_size, per_layer=False, progress=False)
    values = scores.total[0].to(torch.float64).tolist()
    influence, i = {}, 0
    for cond in CONDITIONS:
        influence[cond] = values[i : i + len(texts[cond])]
        i += len(texts[cond])
    return ProbeResult(
        prompt=prompt,
        completion=completion,
        prompt_phrase=p_phrase,
        completion_phrase=c_phrase,
        sequences=texts,
        influence=influence,
        n_train=inverse.curvature.n_train if n_train is None else int(n_train),
        nats=calibrated(inverse.describe()),
        inverse=inverse.describe(),
    )
