"""Crash-safety check: SIGKILL a resumable fit + scan at random moments, resume, compare with an unbroken run.

A worker process fits EK-FAC (``fit_curvature(out_dir=...)``, checkpointing every few sequences) and then scans
(``scan(out_dir=...)``, small shards, full scores kept) on a tiny pure-torch causal LM. The controller

1. runs the worker once without interruption (the reference) and times its work;
2. in a fresh run directory, starts the worker, waits until it has imported everything, sleeps a random time
   in [0, work time) and sends SIGKILL; repeats on the same directory until the worker finishes; then starts a
   new directory, until at least ``--kills`` kills have landed;
3. checks every finished directory against the reference: identical factors, identical scan results and full
   score matrix (bit for bit: nothing lost, nothing counted twice), every sequence counted once, no checkpoint
   or temporary file left behind.

    OMP_NUM_THREADS=1 python scripts/kill_test.py              # ≥ 20 kills (a few minutes on a loaded CPU)
    OMP_NUM_THREADS=1 python scripts/kill_test.py --kills 4    # quick

Prints the number of kills and where they landed (fit stage or scan). Exit status 0 when every check passes.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # this checkout's influencer

N_TRAIN, SEQ_LEN, VOCAB = 4000, 16, 96
CHECKPOINT_EVERY, SHARD_SIZE = 100, 100


class TinyLM(nn.Module):
    """Embedding → causal running mean → two residual tanh MLP blocks → vocabulary head (pure torch)."""

    def __init__(self, vocab: int = VOCAB, d: int = 24, hidden: int = 48, seed: int = 0):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.embed = nn.Embedding(vocab, d)
            self.blocks = nn.ModuleList(
                nn.ModuleDict({"up": nn.Linear(d, hidden), "down": nn.Linear(hidden, d)}) for _ in range(2)
            )
            self.head = nn.Linear(d, vocab)
        self.eval()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        x = x.cumsum(1) / torch.arange(1, ids.shape[1] + 1, device=ids.device).unsqueeze(-1)
        for block in self.blocks:
            x = x + block["down"](torch.tanh(block["up"](x)))
        return self.head(x)


def problem(n_train: int = N_TRAIN):
    g = torch.Generator().manual_seed(1)
    train = torch.randint(0, VOCAB, (n_train, SEQ_LEN), generator=g)
    queries = {"input_ids": torch.randint(0, VOCAB, (3, 12), generator=g), "prompt_length": 5}
    return TinyLM(), train, queries


def worker(run: Path, n_train: int) -> None:
    import influencer as inf
    from influencer.layers import select_layers

    torch.set_num_threads(1)
    model, train, queries = problem(n_train)
    task = inf.CausalLM()
    select_layers(model, "all")  # warm the lazy imports before the controller starts its clock
    print("READY", flush=True)
    curv = inf.fit_curvature(
        model,
        task,
        train,
        layers=r"blocks\.",
        out_dir=run / "fit",
        batch_size=8,
        checkpoint_every=CHECKPOINT_EVERY,
        progress=False,
    )
    print("FIT", flush=True)
    inf.scan(
        model,
        task,
        curv,
        queries,
        train,
        rank=4,
        top_k=8,
        keep_scores=True,
        batch_size=8,
        out_dir=run / "scan",
        shard_size=SHARD_SIZE,
        progress=False,
    )
    print("DONE", flush=True)


# --------------------------------------------------------------------------------------------------------
# Controller
# --------------------------------------------------------------------------------------------------------


def _start(run: Path, n_train: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    src = Path(__file__).resolve().parents[1] / "src"
    env["PYTHONPATH"] = os.pathsep.join([str(src), env.get("PYTHONPATH", "")])
    return subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--worker", str(run), "--n-train", str(n_train)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _wait_ready(proc: subprocess.Popen) -> None:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "READY":
        proc.wait()
        raise RuntimeError(f"worker failed to start: {line}{proc.stderr.read() if proc.stderr else ''}")


def _phase(run: Path, printed: str) -> str:
    """Where a kill landed, from the worker's output and the run directory."""
    if "FIT" not in printed:
        fit = run / "fit" / "fit.json"
        done = json.loads(fit.read_text())["done"] if fit.is_file() else []
        return "fit/eigenvalues" if "covariance" in done else "fit/covariance"
    scan = run / "scan" / "scan.json"
    if not scan.is_file() or not (run / "scan" / "queries.json").is_file():
        return "scan/queries"
    state = json.loads(scan.read_text())
    return "scan/shards" if len(state["done"]) < state["shards"] else "scan/tokens+save"


def _run_to_end(run: Path, n_train: int) -> float:
    """Run the worker to the end; returns the seconds from READY to DONE (its work, without start-up/exit)."""
    proc = _start(run, n_train)
    _wait_ready(proc)
    t0 = time.perf_counter()
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.strip() == "DONE":
            break
    work = time.perf_counter() - t0
    _, err = proc.communicate(timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"worker failed:\n{err}")
    return work


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    from influencer.io import load_tensors

    return load_tensors(path)


def check_same(run: Path, ref: Path, n_train: int) -> None:
    """The resumed run directory holds exactly the reference results."""
    import influencer as inf

    for rel in ("fit/curvature/factors.safetensors", "scan/result.safetensors"):
        a, b = _tensors(run / rel), _tensors(ref / rel)
        if a.keys() != b.keys():
            raise AssertionError(f"{rel}: different entries")
        for key in a:
            if not torch.equal(a[key], b[key]):
                raise AssertionError(f"{rel}: '{key}' differs from the uninterrupted run")
    from influencer.io import read_json

    ma = read_json(run / "fit/curvature/manifest.json", sealed=True)  # verified; the seal covers save_token
    mb = read_json(ref / "fit/curvature/manifest.json", sealed=True)
    ma.pop("save_token"), mb.pop("save_token")
    if ma != mb:
        raise AssertionError("fit manifests differ")
    ra, rb = inf.ScanResult.load(run / "scan"), inf.ScanResult.load(ref / "scan")
    if not torch.equal(ra.scores, rb.scores) or bool(ra.scores.isnan().any()):
        raise AssertionError("full score matrices differ (or miss sequences)")
    if not all(ra.stats(q)["count"] == n_train for q in range(ra.n_queries)):
        raise AssertionError("a sequence was counted twice or not at all")
    leftovers = [p for p in run.rglob("*") if p.name.endswith(".tmp") or "partial" in p.parts]
    if leftovers:
        raise AssertionError(f"left behind: {leftovers}")


def run_kill_test(kills: int, *, n_train: int = N_TRAIN, seed: int = 0, base: Path | None = None, log=print) -> dict:
    """Kill, resume and compare until ``kills`` SIGKILLs have landed; returns a summary (raises on a mismatch)."""
    base = Path(tempfile.mkdtemp(prefix="influencer-kill-")) if base is None else base
    ref = base / "reference"
    work = _run_to_end(ref, n_train)
    log(f"reference run: {work:.1f} s of work after start-up")
    rng = random.Random(seed)
    landed: collections.Counter[str] = collections.Counter()
    total, rounds, resumes = 0, 0, 0
    while total < kills:
        run = base / f"round{rounds}"
        run_killed = False
        while True:
            proc = _start(run, n_train)
            _wait_ready(proc)
            started = time.perf_counter()
            delay = rng.uniform(0.0, work)
            try:
                proc.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                printed, _ = proc.communicate()
                total += 1
                run_killed = True
                landed[_phase(run, printed)] += 1
                resumes += 1
                if total >= kills:
                    _run_to_end(run, n_train)
                    break
                continue
            if proc.returncode != 0:
                raise RuntimeError(f"worker failed:\n{proc.stderr.read() if proc.stderr else ''}")
            if not run_killed:  # an unbroken run finished before its kill: the machine got faster
                work = min(work, 0.9 * (time.perf_counter() - started))
            break
        check_same(run, ref, n_train)
        rounds += 1
        log(f"round {rounds}: identical to the uninterrupted run ({total} kills so far)")
    summary = {"kills": total, "rounds": rounds, "resumes": resumes, "where": dict(sorted(landed.items()))}
    log(
        f"{total} SIGKILLs at random moments over {rounds} runs, each resumed to the same results as an "
        f"uninterrupted run; kills landed in: {summary['where']}"
    )
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-train", type=int, default=N_TRAIN)
    parser.add_argument("--dir", type=Path, default=None, help="where the runs go (default: a new temp dir)")
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        worker(args.worker, args.n_train)
        return
    run_kill_test(args.kills, n_train=args.n_train, seed=args.seed, base=args.dir)


if __name__ == "__main__":
    main()
