"""Compare influencer.plan's predictions with a measured run (peak RSS and time per stage), each in a fresh process.

    OMP_NUM_THREADS=1 python scripts/plan_check.py             # built-in SmolLM2-135M-Instruct, MLPs of blocks 0-5
    OMP_NUM_THREADS=1 python scripts/plan_check.py --layers mlp --n-train 128 --json out.json

The measured run fits EK-FAC, builds the rank-k query store and scans (no token pass), sampling the process's
RSS every 2 ms; the prediction runs ``plan`` with the same settings in another process.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def _setup(args):
    import torch

    from influencer import CausalLM
    from influencer.data import kjv_verses, tokenize_texts
    from influencer.models import load_model

    torch.set_num_threads(1)
    model, tok = load_model(args.model)
    task = CausalLM(pad_token_id=tok.pad_token_id)
    texts = [v["text"] for v in kjv_verses(args.n_train + args.n_queries)]
    data = tokenize_texts(tok, texts, max_length=args.seq_len)
    train = {k: v[: args.n_train] for k, v in data.items()}
    queries = {**{k: v[args.n_train :] for k, v in data.items()}, "prompt_length": 4}
    return model, task, train, queries


def predict(args) -> dict:
    from influencer.plan import plan

    model, task, train, _ = _setup(args)
    t0 = time.perf_counter()
    p = plan(
        model,
        task,
        args.layers,
        rank=args.rank,
        n_queries=args.n_queries,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        n_train=args.n_train,
        data=train,
    )
    out = p.to_dict()
    out["plan_seconds"] = time.perf_counter() - t0
    out["report"] = p.report()
    return out


def measure(args) -> dict:
    import influencer as inf
    from influencer.plan import _rss, measure_peak_rss

    model, task, train, queries = _setup(args)
    peaks: dict = {"baseline": _rss()}
    t0 = time.perf_counter()
    curv, peaks["fit"] = measure_peak_rss(
        inf.fit_curvature, model, task, train, layers=args.layers, batch_size=args.batch_size, progress=False
    )
    t1 = time.perf_counter()
    store, peaks["queries"] = measure_peak_rss(inf.QueryStore.build, model, task, curv, queries, rank=args.rank)
    t2 = time.perf_counter()
    _, peaks["scan"] = measure_peak_rss(
        inf.scan,
        model,
        task,
        curv,
        queries,
        train,
        store=store,
        batch_size=args.batch_size,
        progress=False,
        tokens=False,
    )
    t3 = time.perf_counter()
    peaks.update({"fit_s": t1 - t0, "queries_s": t2 - t1, "scan_s": t3 - t2})
    return peaks


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layers", default=r"model\.layers\.[0-5]\.mlp\.")
    parser.add_argument("--n-train", type=int, default=64)
    parser.add_argument("--n-queries", type=int, default=4)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=48)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--role", choices=("predict", "measure"), default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role is not None:
        print("JSON" + json.dumps(predict(args) if args.role == "predict" else measure(args)))
        return
    results = {}
    for role in ("predict", "measure"):
        cmd = [sys.executable, __file__, "--role", role, *(argv if argv is not None else sys.argv[1:])]
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if out.returncode != 0:
            raise SystemExit(out.stderr)
        results[role] = json.loads(out.stdout.split("JSON", 1)[1])
    p, m = results["predict"], results["measure"]
    stages = {s["name"]: s for s in p["stages"]}
    fit_names = [n for n in ("covariance", "eigh", "eigenvalues", "diagonal") if n in stages]
    rows = [
        ("fit", max(stages[n]["memory"] for n in fit_names), sum(stages[n]["seconds"] for n in fit_names)),
        ("queries", stages["queries"]["memory"], stages["queries"]["seconds"]),
        ("scan", stages["scan"]["memory"], stages["scan"]["seconds"]),
    ]
    print(p["report"])
    print(f"\n{'stage':<8} {'predicted':>10} {'measured':>10} {'ratio':>6} {'pred. s':>8} {'meas. s':>8}")
    for name, mem, sec in rows:
        print(
            f"{name:<8} {mem / 2**20:>7.0f} MiB {m[name] / 2**20:>6.0f} MiB {mem / m[name]:>6.2f} {sec:>8.1f} "
            f"{m[name + '_s']:>8.1f}"
        )
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
