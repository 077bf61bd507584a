"""influencer and Kronfluence side by side, in one process, on the same model, data, queries and thread count.

Workload (issue 19): ``bench_fit``'s tiny Llama (4 layers, hidden 256, MLP 1024, vocab 4096, random init, fp32),
1,024 random training rows × 64 tokens at batch 32, 64 random 24-token queries whose last 12 tokens are the
completion (measurement: log p(completion | prompt)), the 12 MLP linears tracked, EK-FAC, rank-32 query
compression, no per-token scores. Each side is timed for

- fit: ``inf.fit_curvature(strategy="ekfac", fisher="true")`` / ``Analyzer.fit_all_factors(strategy="ekfac")``;
- store + scan: ``QueryStore.build`` + ``inf.scan(store=..., rank=32, tokens=False, refine=0)`` (our plain
  EK-FAC path, as Kronfluence computes it) / ``Analyzer.compute_pairwise_scores(query_gradient_low_rank=32)``
  (query gradients, preconditioning, compression and the training pass in one call, all 64 queries in one batch).

Every time is divided by the floor (forward + ``loss.backward()`` over the same training rows, ``benchkit``), so
each side's ratio is its cost in training passes; the ratio of the two sides is what the issue's target reads
(store + scan ≤ 0.5× Kronfluence's). Best of ``--repeats``. Kronfluence is a benchmark-only dependency
(``make bench-deps``); never imported by the library.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_kronfluence.py --write

``--setup smollm2`` runs the paper's shape instead: SmolLM2-135M-Instruct (de-quantized from a 4-bit GGUF), its 90
MLP linears, KJV packed into ``--max-len`` (512) token rows, queries = the first 24 tokens of the next rows:

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_kronfluence.py --setup smollm2 --rows 16 --batch 4 \
        --query-batch 16 --write
"""

from __future__ import annotations

import argparse
import copy
import shlex
import sys
import tempfile
import time
from typing import Any

import torch
import torch.nn.functional as F

import influencer as inf

from benchkit import (
    SEED,
    Setup,
    environment,
    floor_pass,
    full_rows,
    random_rows,
    smollm2_packed,
    subset,
    tiny_llama,
    write_results,
)

PROMPT, QUERY_LEN = 12, 24
# the contraction's precision: ours (scan(precision=...)) / theirs (per-sample gradients and scores in that dtype)
PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class _Rows(torch.utils.data.Dataset):
    """Rows as Kronfluence reads them: input_ids, attention_mask, labels (−100 where not scored)."""

    def __init__(self, ids: torch.Tensor, prompt: int = 0):
        self.ids = ids
        self.labels = ids.clone()
        self.labels[:, :prompt] = -100

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.labels[i]}


def kronfluence_task(layer_names: list[str]) -> Any:
    from kronfluence.task import Task

    class LMTask(Task):
        """Next-token NLL (sampled labels for the true Fisher); measurement log p(labels) summed over tokens."""

        def compute_train_loss(self, batch: Any, model: torch.nn.Module, sample: bool = False) -> torch.Tensor:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            logits = logits[:, :-1].flatten(0, 1)
            if sample:
                with torch.no_grad():
                    labels = torch.multinomial(torch.softmax(logits.detach(), -1), 1).flatten()
            else:
                labels = batch["labels"][:, 1:].flatten()
            return F.cross_entropy(logits, labels, reduction="sum", ignore_index=-100)

        def compute_measurement(self, batch: Any, model: torch.nn.Module) -> torch.Tensor:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            return -F.cross_entropy(
                logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), reduction="sum", ignore_index=-100
            )

        def get_influence_tracked_modules(self) -> list[str]:
            return layer_names

        def get_attention_mask(self, batch: Any) -> torch.Tensor:
            return batch["attention_mask"]

    return LMTask()


def best(fn: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--setup", choices=("tiny", "smollm2"), default="tiny")
    p.add_argument("--rows", type=int, default=1024)
    p.add_argument("--max-len", type=int, default=None, help="row length (default: 64 tiny, 512 smollm2)")
    p.add_argument("--batch", type=int, default=32, help="training rows per batch, both libraries")
    p.add_argument("--queries", type=int, default=64)
    p.add_argument("--query-batch", type=int, default=None, help="queries per batch, both libraries (default: all)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--write", action="store_true", help="record the table in benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments

    torch.manual_seed(SEED)
    env = environment()
    length = args.max_len or (64 if args.setup == "tiny" else 512)
    q_batch = args.query_batch or args.queries
    if args.setup == "tiny":
        model, desc = tiny_llama(4096, length)
        train_ids = random_rows(4096, args.rows, length)
        setup = Setup("tiny", desc, model, inf.CausalLM(pad_token_id=0), full_rows(train_ids), args.batch)
        q_ids = random_rows(4096, args.queries, QUERY_LEN, seed=SEED + 1)
        data_desc = f"{args.rows} random training rows × {length} tokens"
    else:
        _, packed = smollm2_packed(args.rows + args.queries, length, args.batch)
        model, desc = packed.model, packed.description
        train_ids = packed.train["input_ids"][: args.rows]
        setup = Setup("smollm2", desc, model, packed.task, subset(packed.train, args.rows), args.batch)
        q_ids = packed.train["input_ids"][args.rows :, :QUERY_LEN].contiguous()
        data_desc = f"{args.rows} training rows × {length} tokens"
    n_layers = len(inf.select_layers(model, "mlp"))
    queries = {"input_ids": q_ids, "prompt_length": torch.full((args.queries,), PROMPT)}
    layers = [x.name for x in inf.select_layers(model, "mlp")]

    floor_pass(setup, subset(setup.train, min(args.rows, 2 * args.batch)))  # warm-up
    floor = best(lambda: floor_pass(setup, setup.train), max(2, args.repeats))
    log(f"floor {floor:.2f} s")

    ours: dict[str, float] = {}
    curv_box: list[Any] = []
    ours["fit"] = best(
        lambda: curv_box.append(
            inf.fit_curvature(model, setup.task, setup.train, layers="mlp", batch_size=args.batch, progress=False)
        ),
        args.repeats,
    )
    curv = curv_box[-1]
    log(f"influencer fit {ours['fit']:.2f} s")
    store_box: list[Any] = []
    ours["store"] = best(
        lambda: store_box.append(inf.QueryStore.build(model, setup.task, curv, queries, rank=32, batch_size=q_batch)),
        args.repeats,
    )
    store = store_box[-1]
    for precision in PRECISIONS:
        ours[f"scan {precision}"] = best(
            lambda precision=precision: inf.scan(
                model,
                setup.task,
                curv,
                queries,
                setup.train,
                store=store,
                rank=32,
                top_k=10,
                batch_size=args.batch,
                tokens=False,
                refine=0,
                precision=precision,
                progress=False,
            ),
            args.repeats,
        )
    log(f"influencer store {ours['store']:.2f} s, scans {ours}")

    theirs: dict[str, float] = {}
    task = kronfluence_task(layers)
    kmodel = prepare_model(copy.deepcopy(model), task)  # the same weights, wrapped by Kronfluence
    train_ds, query_ds = _Rows(train_ids), _Rows(q_ids, PROMPT)
    with tempfile.TemporaryDirectory() as out:
        analyzer = Analyzer("bench", kmodel, task, cpu=True, disable_tqdm=True, output_dir=out)
        theirs["fit"] = best(
            lambda: analyzer.fit_all_factors(
                "ekfac",
                train_ds,
                per_device_batch_size=args.batch,
                factor_args=FactorArguments(strategy="ekfac"),
                overwrite_output_dir=True,
            ),
            args.repeats,
        )
        log(f"kronfluence fit {theirs['fit']:.2f} s")
        for precision, dtype in PRECISIONS.items():
            score_args = ScoreArguments(query_gradient_low_rank=32, per_sample_gradient_dtype=dtype, score_dtype=dtype)
            theirs[f"store + scan {precision}"] = best(
                lambda score_args=score_args: analyzer.compute_pairwise_scores(
                    "scores",
                    "ekfac",
                    query_ds,
                    train_ds,
                    per_device_query_batch_size=q_batch,
                    per_device_train_batch_size=args.batch,
                    score_args=score_args,
                    overwrite_output_dir=True,
                ),
                args.repeats,
            )
        log(f"kronfluence {theirs}")
    import kronfluence

    rows = [("fit", ours["fit"], theirs["fit"]), ("store", ours["store"], None)]
    for precision in PRECISIONS:
        scan = ours[f"scan {precision}"]
        rows += [
            (f"scan, {precision}", scan, None),
            (f"store + scan, {precision}", ours["store"] + scan, theirs[f"store + scan {precision}"]),
        ]
    cmd = f"OMP_NUM_THREADS={torch.get_num_threads()} .venv/bin/python benchmarks/" + " ".join(
        shlex.quote(a) for a in ["bench_kronfluence.py", *(argv if argv is not None else sys.argv[1:])]
    )
    title = "influencer vs Kronfluence (issue 19)" + ("" if args.setup == "tiny" else ", the paper's shape")
    lines = [f"## {title}", "", f"`{cmd}`", ""]
    lines += [f"- {k}: {v}" for k, v in env.items()]
    lines += [
        f"- kronfluence: {getattr(kronfluence, '__version__', 'unknown')}",
        "",
        f"{desc}; {data_desc} at batch {args.batch}; {args.queries} {QUERY_LEN}-token queries (completion = the "
        f"last {QUERY_LEN - PROMPT}; {q_batch} per batch); the {n_layers} MLP linears; EK-FAC (true Fisher); "
        "rank-32 query compression; no per-token scores. Floor (forward + backward over the training rows) = "
        f"{floor:.2f} s. "
        "float32: both libraries' defaults; bfloat16: our scan(precision='bfloat16') beside Kronfluence's "
        "per_sample_gradient_dtype = score_dtype = bfloat16.",
        "",
        "| stage | influencer (s) | ÷ floor | Kronfluence (s) | ÷ floor | influencer / Kronfluence |",
        "|---|---|---|---|---|---|",
    ]
    for name, a, b in rows:
        kf = "" if b is None else f"{b:.2f} | {b / floor:.2f}"
        ratio = "" if b is None else f"**{a / b:.2f}**"
        lines.append(f"| {name} | {a:.2f} | {a / floor:.2f} | {kf or ' | '} | {ratio} |")
    section = "\n".join(lines) + "\n"
    print(section)
    if args.write:
        write_results(section, "bench-kronfluence" if args.setup == "tiny" else "bench-kronfluence-paper")


if __name__ == "__main__":
    main()
