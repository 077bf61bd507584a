"""Worker of tests/test_distributed.py: one rank of a gloo process group (RANK/WORLD_SIZE/MASTER_* in the env).

Fits and scans a tiny Llama inside the group and saves every result under ``<out>/r<rank>/`` so that the test can
compare ranks with each other and with a single process. Also runs as a single process (WORLD_SIZE unset).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
torch.set_num_threads(1)

import zoo  # noqa: E402

import influencer as inf  # noqa: E402
import influencer.distributed as dist  # noqa: E402

N_TRAIN = 37  # uneven over 2 ranks


def setup():
    model = zoo.tiny_llama(hidden=16, intermediate=32, layers=3)
    if os.environ.get("INFLUENCER_TEST_DEVICE"):  # e.g. "cuda": the same run with the model on that device
        model = model.to(os.environ["INFLUENCER_TEST_DEVICE"])
    task = inf.CausalLM()
    train = zoo.token_data(N_TRAIN, t=9)
    queries = {"input_ids": zoo.token_data(4, t=8, seed=3), "prompt_length": torch.tensor([2, 3, 4, 3])}
    return model, task, train, queries


def main(out: Path) -> None:
    dist.init(backend="gloo")
    me = out / f"r{dist.rank()}"
    model, task, train, queries = setup()
    curv = inf.fit_curvature(model, task, train, batch_size=4, progress=False)
    curv.save(me / "curv")
    resumable = inf.fit_curvature(
        model, task, train, batch_size=4, progress=False, out_dir=out / "fit", checkpoint_every=5
    )
    resumable.save(me / "curv_resumable")
    result = inf.scan(
        model, task, curv, queries, train, rank=4, top_k=5, keep_scores=True, batch_size=3, progress=False
    )
    result.save(me / "scan")
    sharded = inf.scan(
        model,
        task,
        curv,
        queries,
        train,
        rank=4,
        top_k=5,
        batch_size=3,
        progress=False,
        out_dir=out / "scan_dir",
        shard_size=6,
    )
    sharded.save(me / "scan_sharded")
    # partitions inside a process group: two data ranges, each run by both ranks
    paths = [
        inf.fit_partition(model, task, train, out / f"part{i}", data_range=r, batch_size=4, progress=False)
        for i, r in enumerate([(0, 20), (20, N_TRAIN)])
    ]
    basis = inf.merge_fit(paths)
    lam = [
        inf.fit_partition(model, task, train, out / f"lam{i}", data_range=r, basis=basis, progress=False)
        for i, r in enumerate([(0, 11), (11, N_TRAIN)])
    ]
    inf.merge_fit(lam, basis=basis).save(me / "curv_partitions")
    dist.barrier()
    dist.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
