"""Micro-benchmark of the per-batch kernels of the fitting passes: the engine's forms vs candidate rewrites.

Companion to ``bench_fit.py`` (whose profile shows where the passes spend their time): this times, on the
shapes of its two setups (one MLP block: gate/up [d_out, w] = [4h, h] and down = [h, 4h]), alternatives for

- the covariance accumulation ``acc += xᵀx`` (allocating matmul + add) against ``acc.addmm_(xᵀ, x)`` (the engine
  since 87d8ad3) and a symmetric form that computes only the upper block triangle (k×k blocks, mirrored
  once at the end: (k+1)/2k of the flops);
- the EK-FAC Λ accumulation ``acc += bmm(g̃ᵀ, ã).pow(2).sum(0)`` (the engine before 87d8ad3) against an in-place
  square, a version tiled over d_out so each tile stays in cache while it is squared and summed, and per-sequence
  matmul + ``addcmul_`` (the engine since 87d8ad3; with or without a reused output buffer);

and checks every candidate against the first (the engine's form before commit 87d8ad3). Random data; the
rotations are included in the Λ timings.

    .venv/bin/python benchmarks/bench_fit_kernels.py          # 1 thread, best of 7 rounds (process CPU time)
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from collections.abc import Callable

import torch

# ---------------------------------------------------------------------------------------------- covariance


def cov_current(acc: torch.Tensor, x: torch.Tensor) -> None:
    acc += x.T @ x


def cov_addmm(acc: torch.Tensor, x: torch.Tensor) -> None:
    acc.addmm_(x.T, x)


def cov_upper(k: int) -> Callable[[torch.Tensor, torch.Tensor], None]:
    def run(acc: torch.Tensor, x: torch.Tensor) -> None:
        d = x.shape[1]
        edges = [round(i * d / k) for i in range(k + 1)]
        for i in range(k):
            r0, r1 = edges[i], edges[i + 1]
            xi = x[:, r0:r1]
            for j in range(i, k):
                c0, c1 = edges[j], edges[j + 1]
                acc[r0:r1, c0:c1].addmm_(xi.T, x[:, c0:c1])

    return run


def mirror_upper(acc: torch.Tensor) -> torch.Tensor:
    """Full symmetric matrix from its upper block triangle (done once per fit, not per batch)."""
    upper = torch.triu(acc)
    return upper + torch.triu(acc, 1).T


# --------------------------------------------------------------------------------------------------- Λ


def rotate(g: torch.Tensor, a: torch.Tensor, qs: torch.Tensor, qa: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return g @ qs, a @ qa


def lam_current(acc: torch.Tensor, g: torch.Tensor, a: torch.Tensor, qs: torch.Tensor, qa: torch.Tensor) -> None:
    gt, at = rotate(g, a, qs, qa)
    acc += torch.bmm(gt.mT, at).pow(2).sum(0)


def lam_inplace(acc: torch.Tensor, g: torch.Tensor, a: torch.Tensor, qs: torch.Tensor, qa: torch.Tensor) -> None:
    gt, at = rotate(g, a, qs, qa)
    r = torch.bmm(gt.mT, at)
    acc += r.square_().sum(0)


def lam_tiled(tile_bytes: int) -> Callable[..., None]:
    def run(acc: torch.Tensor, g: torch.Tensor, a: torch.Tensor, qs: torch.Tensor, qa: torch.Tensor) -> None:
        gt, at = rotate(g, a, qs, qa)
        b, _, d = gt.shape
        w = at.shape[2]
        rows = max(1, min(d, tile_bytes // (4 * b * w)))
        gtt = gt.mT  # [B, d, T]
        for r0 in range(0, d, rows):
            r = torch.bmm(gtt[:, r0 : r0 + rows], at)
            acc[r0 : r0 + rows] += r.square_().sum(0)

    return run


def lam_engine(acc: torch.Tensor, g: torch.Tensor, a: torch.Tensor, qs: torch.Tensor, qa: torch.Tensor) -> None:
    """As ``linalg.accumulate_squared_grads`` since 87d8ad3: transposed [w, d_out] accumulator, one matmul and
    one addcmul_ per sequence (compared transposed back)."""
    gt, at = rotate(g, a, qs, qa)
    acc_t = acc.T
    for n in range(len(gt)):
        x = at[n].T @ gt[n]
        acc_t.addcmul_(x, x)


def lam_per_example_tiled(tile_bytes: int) -> Callable[..., None]:
    """Per sequence, in column tiles of the [w, d_out] product small enough to stay in L2 while squared."""

    def run(acc: torch.Tensor, g: torch.Tensor, a: torch.Tensor, qs: torch.Tensor, qa: torch.Tensor) -> None:
        gt, at = rotate(g, a, qs, qa)
        acc_t = acc.T  # [w, d_out] like the engine
        w, d = acc_t.shape
        cols = max(1, min(d, tile_bytes // (4 * w)))
        bufs = [torch.empty(w, min(cols, d - c0)) for c0 in range(0, d, cols)]
        for n in range(len(gt)):
            an = at[n].T
            for buf, c0 in zip(bufs, range(0, d, cols), strict=True):
                torch.mm(an, gt[n, :, c0 : c0 + buf.shape[1]], out=buf)
                acc_t[:, c0 : c0 + buf.shape[1]].addcmul_(buf, buf)

    return run


def lam_per_example(acc: torch.Tensor, g: torch.Tensor, a: torch.Tensor, qs: torch.Tensor, qa: torch.Tensor) -> None:
    gt, at = rotate(g, a, qs, qa)
    buf = torch.empty(acc.shape, dtype=acc.dtype)
    for n in range(len(gt)):
        torch.mm(gt[n].T, at[n], out=buf)
        acc.addcmul_(buf, buf)


# ------------------------------------------------------------------------------------------------ main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--write", action="store_true", help="replace this script's section in benchmarks/RESULTS.md")
    args = p.parse_args()
    argv = sys.argv[1:]
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    setups = {"tiny": (32, 64, 256), "smollm2": (8, 48, 576)}  # batch, tokens, hidden (MLP = 4h / 8h/3)
    cases: list[tuple[str, str, Callable[[], object], float]] = []  # (row prefix, label, run, max rel. error)
    for name, (b, t, h) in setups.items():
        f = 1024 if name == "tiny" else 1536
        for layer, (d_out, w) in (("gate/up", (f, h)), ("down", (h, f))):
            a = torch.randn(b, t, w)
            g = torch.randn(b, t, d_out) * 1e-2
            # covariance of the larger side (S for gate/up, A for down)
            x = (g if d_out >= w else a).reshape(-1, max(d_out, w))
            dim = x.shape[1]
            ref = torch.zeros(dim, dim)
            cov_current(ref, x)
            prefix = f"| {name} | {layer} [{d_out}, {w}] | covariance ({dim}²)"
            for label, fn, post in (
                ("acc += xᵀx (engine before 87d8ad3)", cov_current, None),
                ("acc.addmm_(xᵀ, x) (engine now)", cov_addmm, None),
                ("upper triangle, 2×2 blocks", cov_upper(2), mirror_upper),
                ("upper triangle, 4×4 blocks", cov_upper(4), mirror_upper),
                ("upper triangle, 8×8 blocks", cov_upper(8), mirror_upper),
            ):
                check = torch.zeros(dim, dim)
                fn(check, x)
                check = post(check) if post is not None else check
                err = float((check - ref).abs().max() / ref.abs().max())
                acc = torch.zeros(dim, dim)
                cases.append((prefix, label, lambda fn=fn, acc=acc, x=x: fn(acc, x), err))
            qs = torch.linalg.qr(torch.randn(d_out, d_out))[0]
            qa = torch.linalg.qr(torch.randn(w, w))[0]
            ref = torch.zeros(d_out, w)
            lam_current(ref, g, a, qs, qa)
            prefix = f"| {name} | {layer} [{d_out}, {w}] | Λ (rotate + contract + square-sum)"
            for label, fn in (
                ("bmm → pow(2) → sum(0) (engine before 87d8ad3)", lam_current),
                ("bmm → square_() → sum(0)", lam_inplace),
                ("tiled over d_out, 256 KB tiles", lam_tiled(256 << 10)),
                ("tiled over d_out, 1 MB tiles", lam_tiled(1 << 20)),
                ("per sequence ãᵀg̃ + addcmul_ (engine now)", lam_engine),
                ("per sequence mm(out=buf) + addcmul_", lam_per_example),
                ("per sequence, ≤ 512 KB column tiles", lam_per_example_tiled(512 << 10)),
                ("per sequence, ≤ 1 MB column tiles", lam_per_example_tiled(1 << 20)),
            ):
                check = torch.zeros(d_out, w)
                fn(check, g, a, qs, qa)
                err = float((check - ref).abs().max() / ref.abs().max())
                acc = torch.zeros(d_out, w)
                cases.append((prefix, label, lambda fn=fn, acc=acc, args=(g, a, qs, qa): fn(acc, *args), err))
    # rounds over all cases (interleaved, so that background load hits every variant alike); best CPU time
    best_cpu = [float("inf")] * len(cases)
    for round_ in range(args.repeats + 1):
        for i, (_, _, run, _) in enumerate(cases):
            t0 = time.process_time()
            run()
            if round_ > 0:  # the first round warms up
                best_cpu[i] = min(best_cpu[i], time.process_time() - t0)
    lines = [
        "## Kernels of the fitting passes (`benchmarks/bench_fit_kernels.py`)\n",
        f"Command: `.venv/bin/python benchmarks/bench_fit_kernels.py{' ' if argv else ''}{' '.join(argv)}`; "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; threads={torch.get_num_threads()}; "
        f"torch {torch.__version__}. Process CPU ms per batch of one layer (random data, batch × tokens of the "
        f"bench_fit setups), best of {args.repeats} interleaved rounds after a warm-up round. Λ rows include the "
        "two token rotations. In an isolated loop a fresh allocation per call pays for page faults that a full "
        "pass mostly does not (the in-pass gain of the reused buffer is ~3%, see the notes).\n",
        "| setup | layer [d_out, w] | kernel | variant | CPU ms | vs first | max rel. error |",
        "|---|---|---|---|---:|---:|---:|",
    ]
    base = 0.0
    for (prefix, label, _, err), sec in zip(cases, best_cpu, strict=True):
        if "engine before" in label:
            base = sec
        lines.append(f"{prefix} | {label} | {1e3 * sec:.2f} | {sec / base:.2f}× | {err:.1e} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        from bench_fit import write_results

        write_results(text, key="bench_fit_kernels")


if __name__ == "__main__":
    main()
