"""Crash safety of the command-line fit: SIGKILL ``influencer fit`` at random moments, run the same command
again until it finishes, and compare with an uninterrupted run.

A tiny Llama saved as a Hugging Face folder (``tests/tiny_hf.py``) is fitted on KJV verses from a JSON Lines file
with EK-FAC, checkpointing every few sequences. The controller

1. runs ``influencer fit`` once without interruption (the reference) and times it;
2. in a fresh output directory, starts the command, sleeps a random time in [0, that time) and sends SIGKILL;
   repeats the same command until it exits 0; then starts a new directory, until ``--kills`` kills have landed;
3. checks every finished run against the reference: identical factors bit for bit, identical curvature
   manifest (but its save token) and fit record (but times and dates), no partial fit or temporary left.

    OMP_NUM_THREADS=1 python scripts/kill_cli_fit.py               # ≥ 20 kills
    OMP_NUM_THREADS=1 python scripts/kill_cli_fit.py --kills 3     # quick

Prints where the kills landed (start-up, a fit stage, writing). Exit status 0 when every check passes.
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]  # this checkout's influencer; the tiny model kit

N_VERSES, CHECKPOINT_EVERY = 3000, 200


def prepare(base: Path, n_verses: int = N_VERSES) -> tuple[Path, Path]:
    """The tiny model folder and the verses file the fits read (made once per base directory)."""
    from tiny_hf import byte_bpe_tokenizer, tiny_model_folder

    from influencer.data import kjv_verses

    model, data = base / "model", base / "verses.jsonl"
    if not (model / "config.json").is_file():
        tok = byte_bpe_tokenizer([v["text"] for v in kjv_verses(200)])
        tiny_model_folder(model, tokenizer=tok)
    if not data.is_file():
        rows = [json.dumps({"text": v["text"]}) for v in kjv_verses(n_verses)]
        data.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return model, data


def _command(model: Path, data: Path, out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "influencer",
        "fit",
        str(model),
        str(data),
        "--out",
        str(out),
        "--batch-size",
        "4",
        "--checkpoint-every",
        str(CHECKPOINT_EVERY),
        "--max-length",
        "48",
        "--seed",
        "7",
    ]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "COLUMNS": "160"}


def _phase(out: Path) -> str:
    """Where a kill landed, from what the killed fit left."""
    partial = out.parent / f".{out.name}.fit-partial"
    if (out / "run.json").is_file():
        return "done"
    if not partial.exists():
        return "start-up"
    record = partial / "fit.json"
    done = json.loads(record.read_text())["done"] if record.is_file() else []
    if "curvature" in done:
        return "writing the run"
    return "fit/eigenvalues" if "covariance" in done else "fit/covariance"


def check_same(out: Path, ref: Path) -> None:
    """The resumed run holds exactly the reference results, and nothing of the interrupted attempts."""
    import torch

    from influencer.io import load_tensors, read_json

    a, b = load_tensors(out / "curvature/factors.safetensors"), load_tensors(ref / "curvature/factors.safetensors")
    if a.keys() != b.keys() or not all(torch.equal(a[k], b[k]) for k in a):
        raise AssertionError(f"{out}: factors differ from the uninterrupted run")
    ma, mb = (read_json(d / "curvature/manifest.json", sealed=True) for d in (out, ref))
    ma.pop("save_token"), mb.pop("save_token")
    if ma != mb:
        raise AssertionError(f"{out}: curvature manifests differ")
    ra, rb = (json.loads((d / "run.json").read_text()) for d in (out, ref))
    if ra["fit"] != rb["fit"] or ra["data"] != rb["data"]:
        raise AssertionError(f"{out}: run records differ")
    left = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.") and not p.name.endswith(".lock")]
    if left:
        raise AssertionError(f"left behind: {left}")


def run_kill_test(
    kills: int, *, seed: int = 0, base: Path | None = None, log: Callable[[str], Any] = print
) -> dict[str, Any]:
    """Kill, rerun and compare until ``kills`` SIGKILLs have landed; returns a summary (raises on a mismatch)."""
    base = Path(tempfile.mkdtemp(prefix="influencer-cli-kill-")) if base is None else base
    model, data = prepare(base)
    ref = base / "reference"
    t0 = time.perf_counter()
    done = subprocess.run(_command(model, data, ref), env=_env(), capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the reference fit failed:\n{done.stderr}")
    work = time.perf_counter() - t0
    log(f"reference fit: {work:.1f} s including start-up")
    rng = random.Random(seed)
    landed: collections.Counter[str] = collections.Counter()
    total = rounds = 0
    while total < kills:
        out = base / f"round{rounds}"
        while True:
            proc = subprocess.Popen(
                _command(model, data, out), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
            try:
                proc.wait(timeout=rng.uniform(0.0, work) if total < kills else None)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.communicate()
                total += 1
                landed[_phase(out)] += 1
                continue
            _, err = proc.communicate()
            if proc.returncode != 0 and not ("already holds a fit" in err and (out / "run.json").is_file()):
                raise RuntimeError(f"the resumed fit failed:\n{err}")
            break  # finished (or it had finished when killed: the same command then says so and tidies up)
        check_same(out, ref)
        rounds += 1
        log(f"round {rounds}: identical to the uninterrupted fit ({total} kills so far)")
    summary = {"kills": total, "rounds": rounds, "where": dict(sorted(landed.items()))}
    log(
        f"{total} SIGKILLs of `influencer fit` at random moments over {rounds} runs, each resumed by the same "
        f"command to the uninterrupted result; kills landed in: {summary['where']}"
    )
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dir", type=Path, default=None, help="where the runs go (default: a new temp dir)")
    args = parser.parse_args(argv)
    run_kill_test(args.kills, seed=args.seed, base=args.dir)


if __name__ == "__main__":
    main()
