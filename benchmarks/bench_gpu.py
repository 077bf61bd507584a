"""Fit + scan on a GPU: tokens/s and peak GPU memory per stage, in bf16 and fp32 (issue 6).

    python benchmarks/bench_gpu.py                      # SmolLM2-135M-Instruct, KJV verses, every precision
    python benchmarks/bench_gpu.py --random-init        # same architecture with random weights (no GGUF needed)

Stages, each timed with CUDA synchronisation and its own peak-memory counter:

- floor: forward + ``loss.backward()`` with parameter gradients over the fitting data (a training step's work);
- fit: ``fit_curvature`` (covariance pass, eigendecompositions, Λ pass), EK-FAC, true Fisher;
- store: ``QueryStore.build`` of the queries at rank ``--rank``;
- scan: ``scan(tokens=False)`` over the scan set (top-k ±, bands, totals);
- token pass: ``attribute_tokens`` over the scan's hits.

Precisions: "bf16" (model weights in bf16; captured activations are upcast, factors float32, eigh float64),
"autocast" (fp32 weights, forward/backward under ``torch.autocast(dtype=torch.bfloat16)``), "mixed" (fp32 weights
and passes; only the library's two bf16 options on) and "fp32"; the scan's contraction and the fit's Λ pass run in
bf16 (``precision="bfloat16"``) under all but "fp32".
``--packed --max-len 512`` is the paper's shape (KJV packed into 512-token rows; issue 19):

    python benchmarks/bench_gpu.py --packed --max-len 512 --fit-seqs 256 --scan-seqs 1024 --batch 8
With real weights the queries are KJV verses from the scan set split in half, and the script reports where the
source verse ranks (a sanity check of the numbers, not only the speed).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

import influencer as inf
from influencer.scan import attribute_tokens

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SMOLLM2 = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=8192,
    rope_theta=100000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    hidden_act="silu",
)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


@contextlib.contextmanager
def stage(name: str, results: dict[str, dict[str, float]], tokens: int) -> Iterator[None]:
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    yield
    if cuda:
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    results[name] = {"s": dt, "tokens": tokens, "tokens_per_s": tokens / dt, "peak_gib": peak}
    log(f"  {name}: {dt:.2f} s, {tokens / dt:,.0f} tokens/s, peak {peak:.2f} GiB")


@contextlib.contextmanager
def fit_breakdown() -> Iterator[dict[str, float]]:
    """Seconds in each fitting pass (covariance, eigenvalues) and in the eigendecompositions (CUDA-synchronised)."""
    from influencer.curvature import sums as fit_mod  # eigh_blocks and _Fit live in sums.py

    parts: dict[str, float] = {"eigendecompositions": 0.0}

    def sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def timed_eigh(*a: Any, **k: Any) -> Any:
        sync()
        t0 = time.perf_counter()
        out = saved_eigh(*a, **k)
        sync()
        parts["eigendecompositions"] += time.perf_counter() - t0
        return out

    def timed_pass(self: Any, stage: str, *a: Any, **k: Any) -> Any:
        sync()
        t0 = time.perf_counter()
        out = saved_pass(self, stage, *a, **k)
        sync()
        parts[f"{stage} pass"] = parts.get(f"{stage} pass", 0.0) + time.perf_counter() - t0
        return out

    saved_eigh, saved_pass = fit_mod.eigh_blocks, fit_mod._Fit.accumulate
    fit_mod.eigh_blocks, fit_mod._Fit.accumulate = timed_eigh, timed_pass  # type: ignore[method-assign]
    try:
        yield parts
    finally:
        fit_mod.eigh_blocks, fit_mod._Fit.accumulate = saved_eigh, saved_pass  # type: ignore[method-assign]


def load(
    random_init: bool, n_verses: int, max_len: int, packed: bool = False
) -> tuple[torch.nn.Module, dict[str, torch.Tensor], Any]:
    if random_init:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**SMOLLM2))
        gen = torch.Generator().manual_seed(0)
        lengths = torch.randint(max_len // 2, max_len + 1, (n_verses,), generator=gen)
        ids = torch.randint(0, SMOLLM2["vocab_size"], (n_verses, max_len), generator=gen)
        mask = (torch.arange(max_len)[None] < lengths[:, None]).long()
        return model, {"input_ids": ids * mask, "attention_mask": mask}, None
    from influencer.data import kjv_verses, tokenize_texts
    from influencer.models import load_model

    model, tok = load_model("smollm2-135m", dtype=torch.float32)
    if packed:  # the paper's shape: verses packed end to end into max_len-token rows (queries: verses after them)
        from influencer.data import Documents, make_sequences

        verses = kjv_verses(n_verses * max_len // 20)
        docs = Documents([v["text"] for v in verses], [v["citation"] for v in verses])
        seqs = make_sequences(tok, docs, max_length=max_len, packing=True, max_sequences=n_verses)
        after = [v["text"] for v in kjv_verses(n_verses, start=len(verses))]
        return model, seqs.batch, (tok, after)
    texts = [v["text"] for v in kjv_verses(n_verses)]
    return model, tokenize_texts(tok, texts, max_length=max_len), (tok, texts)


def subset(train: dict[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
    return {k: v[:n] for k, v in train.items()}


def floor_pass(
    model: torch.nn.Module, task: inf.CausalLM, train: dict[str, torch.Tensor], batch: int, amp: Callable[[], Any]
) -> None:
    n = len(train["input_ids"])
    for lo in range(0, n, batch):
        b = {k: v[lo : lo + batch].to(DEVICE) for k, v in train.items()}
        with amp():
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().flatten(0, 1), b["input_ids"][:, 1:].flatten(), reduction="none"
        )
        (loss * b["attention_mask"][:, 1:].flatten()).sum().backward()
        model.zero_grad(set_to_none=True)


def run(
    args: argparse.Namespace, precision: str, model32: torch.nn.Module, train: dict[str, torch.Tensor], text: Any
) -> dict[str, Any]:
    model = copy.deepcopy(model32).to(DEVICE, torch.bfloat16 if precision == "bf16" else torch.float32)
    amp: Callable[[], Any] = (
        (lambda: torch.autocast(DEVICE.type, dtype=torch.bfloat16))
        if precision == "autocast"
        else contextlib.nullcontext
    )
    pad = 0 if text is None else (text[0].pad_token_id or 0)
    task = inf.CausalLM(pad_token_id=pad)
    fit_set, scan_set = subset(train, args.fit_seqs), subset(train, args.scan_seqs)
    fit_tokens = int(fit_set["attention_mask"].sum())
    scan_tokens = int(scan_set["attention_mask"].sum())
    if text is None:
        queries = {
            "input_ids": train["input_ids"][: args.queries, :32],
            "prompt_length": torch.full((args.queries,), 16),
        }
        sources = None
    else:
        from influencer.data import split_verse_queries, tokenize_queries

        pick = torch.linspace(0, args.scan_seqs - 1, args.queries).long().tolist()
        prompts, completions = split_verse_queries([text[1][i] for i in pick])
        queries = tokenize_queries(text[0], prompts, completions, max_length=min(args.max_len, 64))
        sources = None if args.packed else pick  # (packed rows hold many verses: no source rank to check)
    res: dict[str, dict[str, float]] = {}
    log(
        f"[{precision}] fit {args.fit_seqs} seqs ({fit_tokens} tokens), scan {args.scan_seqs} seqs "
        f"({scan_tokens} tokens), Q={args.queries}, rank {args.rank}, layers {args.layers}"
    )
    with amp():
        floor_pass(model, task, subset(fit_set, 2 * args.batch), args.batch, amp)  # warm-up
        with stage("floor", res, fit_tokens):
            floor_pass(model, task, fit_set, args.batch, amp)
        with stage("fit", res, fit_tokens), fit_breakdown() as parts:
            curv = inf.fit_curvature(
                model,
                task,
                fit_set,
                layers=args.layers,
                batch_size=args.batch,
                progress=False,
                precision="float32" if precision == "fp32" else "bfloat16",
            )
        res["fit"]["parts"] = parts  # type: ignore[assignment]
        log("  fit parts: " + ", ".join(f"{k} {v:.2f} s" for k, v in parts.items()))
        with stage("store", res, int(queries["input_ids"].numel())):
            store = inf.QueryStore.build(model, task, curv, queries, rank=args.rank, batch_size=16)
        with stage("scan", res, scan_tokens):
            result = inf.scan(
                model,
                task,
                curv,
                queries,
                scan_set,
                store=store,
                rank=args.rank,
                top_k=10,
                batch_size=args.batch,
                tokens=False,
                precision="float32" if precision == "fp32" else "bfloat16",
                refine=0,
                progress=False,
            )
        hits = len({i for q in range(result.n_queries) for i in (h.index for h in result.top(q))})
        layers = curv.bind(model)
        with stage("token pass", res, hits):
            attribute_tokens(model, task, store, layers, task.as_dataset(scan_set), result, batch_size=args.batch)
    out: dict[str, Any] = {
        "precision": precision,
        "stages": res,
        "modes": sorted(set(result.meta["modes"].values())),
        "store": result.meta["store"],
    }
    if sources is not None:
        ranks = []
        for q, src in enumerate(sources):
            top = [h.index for h in result.top(q)]
            ranks.append(top.index(src) + 1 if src in top else None)
        out["source_ranks"] = ranks
        log(f"  source verse ranks (top-10, None = not in top-10): {ranks}")
    del model, curv, store, result
    torch.cuda.empty_cache()
    return out


def markdown(args: argparse.Namespace, runs: list[dict[str, Any]], env: dict[str, str]) -> str:
    lines = [f"Command: `python benchmarks/bench_gpu.py {' '.join(args.argv)}`", ""]
    lines += [f"- {k}: {v}" for k, v in env.items()]
    lines += ["", "| precision | stage | seconds | tokens/s | peak GPU memory (GiB) |", "|---|---|---:|---:|---:|"]
    for r in runs:
        for name, s in r["stages"].items():
            unit = "hits/s" if name == "token pass" else ""
            lines.append(
                f"| {r['precision']} | {name} | {s['s']:.2f} | {s['tokens_per_s']:,.0f} {unit} | {s['peak_gib']:.2f} |"
            )
    lines.append("")
    for r in runs:
        floor = r["stages"]["floor"]["s"]
        ratio = ", ".join(f"{k} {v['s'] / floor:.2f}×" for k, v in r["stages"].items() if k != "floor")
        lines.append(f"- {r['precision']}: ÷ floor: {ratio}; scan modes: {', '.join(r['modes'])}")
        parts = r["stages"]["fit"].get("parts", {})
        if parts:
            lines.append("  - fit: " + ", ".join(f"{k} {v:.2f} s" for k, v in parts.items()))
        if "source_ranks" in r:
            ranks = r["source_ranks"]
            found = [x for x in ranks if x is not None]
            lines.append(
                f"  - source verse in the top-10 for {len(found)}/{len(ranks)} queries, "
                f"rank 1 for {sum(x == 1 for x in found)}"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--random-init", action="store_true", help="SmolLM2-135M-Instruct architecture with random weights")
    p.add_argument("--precisions", default="bf16,autocast,fp32", help="comma-separated: bf16, autocast, mixed, fp32")
    p.add_argument("--fit-seqs", type=int, default=2048)
    p.add_argument("--scan-seqs", type=int, default=8192)
    p.add_argument("--max-len", type=int, default=64)
    p.add_argument("--packed", action="store_true", help="pack KJV verses into --max-len rows (the paper: 512)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--queries", type=int, default=64)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--layers", default="mlp")
    p.add_argument("--json", default=None, help="also write the raw numbers here")
    p.add_argument("--markdown", default=None, help="also write the markdown section here")
    args = p.parse_args(argv)
    unknown = set(args.precisions.split(",")) - {"bf16", "autocast", "mixed", "fp32"}
    if unknown:
        p.error(f"unknown precision(s) {sorted(unknown)}: choose from bf16, autocast, mixed, fp32")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.argv = argv if argv is not None else __import__("sys").argv[1:]
    if not torch.cuda.is_available():
        print("no CUDA device: a CPU dry run of the script (timings mean nothing)")
    env = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none (CPU dry run)",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu threads": str(torch.get_num_threads()),
        "model": "SmolLM2-135M-Instruct architecture, random weights"
        if args.random_init
        else "SmolLM2-135M-Instruct (built-in GGUF, de-quantized)",
        "data": "random token ids"
        if args.random_init
        else f"KJV verses packed into {args.max_len}-token rows"
        if args.packed
        else "KJV verses, one per sequence",
    }
    model, train, text = load(args.random_init, max(args.fit_seqs, args.scan_seqs), args.max_len, args.packed)
    runs = [run(args, precision, model, train, text) for precision in args.precisions.split(",")]
    md = markdown(args, runs, env)
    print(md)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "runs": runs}, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(md)


if __name__ == "__main__":
    main()
