"""Ground truth of the PBRF experiment: :func:`_pbrf_all` solves the PBRF for every chosen training point (one ±ε
pair serves all measurements), stores the results in a checkpoint directory as they come (at most every 30 s) and
resumes from it when the settings match, logs progress, and summarises the Adam solves (steps, convergence).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from influencer.functional import FlatModel
from influencer.io import atomic_save_tensors, atomic_write_json, load_tensors, read_json
from influencer.validate.outputs import _jsonable
from influencer.validate.pbrf import PBRF, PBRFConfig
from influencer.validate.setups import Setup


def _pbrf_all(
    fm: FlatModel,
    s: Setup,
    lam: float,
    cfg: PBRFConfig,
    queries: Any,
    q_idx: Tensor,
    t_idx: Tensor,
    checkpoint: str | os.PathLike | None,
    say: Callable[[str], None],
) -> tuple[Tensor, float, dict]:
    solver = PBRF(fm, s.train, lam, cfg)
    qb = fm.batches(queries, 64, queries=True)
    q = sum(len(i) for i, _ in qb)
    truth = torch.full((q, len(t_idx)), math.nan, dtype=torch.float64)
    infos: list[dict[str, Any]] = [{} for _ in range(len(t_idx))]
    key = {
        "setup": s.name,
        "info": _jsonable(s.info.get("recipe")),
        "config": _jsonable(s.info),
        "damping": lam,
        "pbrf": asdict(cfg),
        "train": t_idx.tolist(),
        "queries": q,
    }
    ck = Path(checkpoint) if checkpoint is not None else None
    seconds = 0.0
    if ck is not None and (ck / "pbrf.json").is_file() and (ck / "pbrf.safetensors").is_file():
        meta = read_json(ck / "pbrf.json")
        if (
            meta.get("key") == json.loads(json.dumps(_jsonable(key)))
            and meta.get("query_indices", q_idx.tolist()) == q_idx.tolist()
        ):
            saved = load_tensors(ck / "pbrf.safetensors")["pbrf"]
            truth.copy_(saved)
            infos = meta["infos"]
            seconds = meta["seconds"]
            say(f"resumed {sum(bool(i) for i in infos)} PBRF points from {ck}")
    t_start = time.perf_counter()
    done_before = sum(bool(i) for i in infos)
    last_save = time.perf_counter()
    for j, idx in enumerate(t_idx.tolist()):
        if infos[j]:
            continue
        val, info = solver.influence(idx, qb)
        truth[:, j] = val
        infos[j] = info
        seconds += info["seconds"]
        done = sum(bool(i) for i in infos)
        if ck is not None and (time.perf_counter() - last_save > 30 or done == len(t_idx)):
            atomic_save_tensors(ck / "pbrf.safetensors", {"pbrf": truth})
            atomic_write_json(
                ck / "pbrf.json",
                _jsonable({"key": key, "query_indices": q_idx.tolist(), "infos": infos, "seconds": seconds}),
            )
            last_save = time.perf_counter()
        if done % max(1, len(t_idx) // 20) == 0 or done == len(t_idx):
            rate = (time.perf_counter() - t_start) / max(1, done - done_before)
            say(f"  PBRF {done}/{len(t_idx)}  ({rate:.1f} s/point, ~{rate * (len(t_idx) - done) / 60:.0f} min left)")
    steps = [i[k]["steps"] for i in infos for k in ("plus", "minus")]
    conv = [i[k]["converged"] for i in infos for k in ("plus", "minus")]
    ratio = [i[k]["grad_ratio"] for i in infos for k in ("plus", "minus")]
    steps_sorted = sorted(steps)
    stats = {
        "solves": len(steps),
        "converged": int(sum(conv)),
        "steps_median": steps_sorted[len(steps) // 2],
        "steps_max": max(steps),
        "steps_mean": sum(steps) / len(steps),
        "grad_ratio_max": max(ratio),
        "epsilon": solver.epsilon,
        "n": solver.n,
    }
    return truth, seconds, stats
