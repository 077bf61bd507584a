"""Prototype rewrites of the fitting passes, timed against the engine's passes and the floor in one run.

``bench_fit.py`` profiles the passes against a plain training step. This script applies the remaining suggested
rewrites on top of the current engine by patching module functions in this process (no source edits) and times
them side by side with the unpatched passes and the floor, on the same setups (``bench_fit`` builders):

- covariance: accumulate only the upper block triangle of AᵀA / SᵀS with in-place ``addmm_`` (k×k blocks, k = 4;
  (k+1)/2k of the flops), mirrored once before the eigendecomposition (patches ``fit.block_covariance``);
- Λ: write each per-sequence product into one reused buffer (``torch.mm(..., out=buf)``) before the fused
  ``addcmul_`` instead of allocating a fresh [w, d_out] tensor per sequence (patches
  ``fit.accumulate_squared_grads``);
- capture: skip the token-mask multiplication (a copy of every ā and g) when the batch has no padding
  (patches ``capture._per_token``).

Eigendecompositions are replaced by identity bases in all timed runs (their cost does not change and is reported
by ``bench_fit.py``); the prototype's A, S and Λ are checked against the unpatched passes.

    .venv/bin/python benchmarks/bench_fit_prototype.py            # half the bench_fit sizes, best of 2
    .venv/bin/python benchmarks/bench_fit_prototype.py --quick
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from typing import Any

import bench_fit as bf
import torch

from influencer import capture as capture_mod
from influencer.curvature import fit as fit_mod
from influencer.curvature import linalg as linalg_mod
from influencer.curvature.core import LayerFactors
from influencer.passes import eval_mode

TRI_BLOCKS = 4


def upper_addmm(acc: torch.Tensor, x: torch.Tensor, k: int = TRI_BLOCKS) -> torch.Tensor:
    """acc += xᵀx on the upper block triangle only (k×k blocks); returns acc."""
    d = x.shape[1]
    edges = [round(i * d / k) for i in range(k + 1)]
    for i in range(k):
        r0, r1 = edges[i], edges[i + 1]
        xi = x[:, r0:r1].T
        for j in range(i, k):
            c0, c1 = edges[j], edges[j + 1]
            acc[r0:r1, c0:c1].addmm_(xi, x[:, c0:c1])
    return acc


def mirror(upper: torch.Tensor) -> torch.Tensor:
    """The symmetric matrix whose upper triangle is ``upper``'s."""
    return torch.triu(upper) + torch.triu(upper, 1).T


def upper_block_covariance(original: Any) -> Any:
    """``block_covariance`` with upper-triangle accumulation (one block, as the benchmark fits use)."""

    def run(x: torch.Tensor, sizes: list[int], dtype: torch.dtype, acc: list[torch.Tensor] | None = None) -> Any:
        if len(sizes) != 1:
            return original(x, sizes, dtype, acc)
        x = x.to(dtype)
        if acc is None:
            acc = [x.new_zeros(x.shape[1], x.shape[1])]
        return [upper_addmm(acc[0], x)]

    return run


def buffered_accumulate(original: Any) -> Any:
    """``accumulate_squared_grads`` writing each per-sequence product into one reused buffer per shape
    (``torch.mm(..., out=buf)``) instead of a fresh [w, d_out] tensor per sequence."""
    buffers: dict[tuple[Any, ...], torch.Tensor] = {}

    def run(
        acc_t: torch.Tensor,
        a: torch.Tensor,
        g: torch.Tensor,
        qs: Any = None,
        qa: Any = None,
        rotated_a: torch.Tensor | None = None,
    ) -> None:
        rotated = qs is not None and qa is not None
        if rotated and not linalg_mod.rotate_tokens_first(a.shape[1], g.shape[2], a.shape[2]):
            return original(acc_t, a, g, qs, qa, rotated_a)
        if rotated:
            a = rotated_a if rotated_a is not None else linalg_mod.rotate(a, qa)
            g = linalg_mod.rotate(g, qs)
        key = (tuple(acc_t.shape), acc_t.dtype, acc_t.device)
        buf = buffers.get(key)
        if buf is None:
            buf = buffers[key] = torch.empty_like(acc_t)
        for b in range(a.shape[0]):
            torch.mm(a[b].T, g[b], out=buf)
            acc_t.addcmul_(buf, buf)
        return None

    return run


def fast_per_token(original: Any) -> Any:
    """``_per_token`` without the mask multiplication when nothing is masked (and no bias column to add)."""

    def run(layer: Any, x: torch.Tensor, g: torch.Tensor, mask: torch.Tensor | None, batch_size: int) -> Any:
        if mask is not None and not layer.bias and x.shape[0] == batch_size and bool(mask.all()):
            a = x.reshape(batch_size, -1, layer.d_in)
            return a, g.reshape(batch_size, -1, layer.d_out), batch_size * a.shape[1]
        return original(layer, x, g, mask, batch_size)

    return run


def covariance(setup: bf.Setup, proto: bool, seen: list[torch.Tensor]) -> tuple[bf.Span, dict[str, LayerFactors]]:
    """Time the covariance pass (eigh stubbed); ``seen`` collects the (symmetrised) A, S it would decompose."""

    def stub(blocks: list[torch.Tensor]) -> Any:
        seen.extend(mirror(b).to(torch.float64) if proto else b.to(torch.float64) for b in blocks)
        return bf._identity_eigh(blocks)

    run, factors = bf.make_run(setup, setup.train)
    patches: list[tuple[Any, str, Any]] = [(fit_mod, "eigh_blocks", lambda f: stub)]
    if proto:
        patches += [(fit_mod, "block_covariance", upper_block_covariance), (capture_mod, "_per_token", fast_per_token)]
    with bf.patched(patches), eval_mode(setup.model):
        t0 = bf.Span.start()
        run.covariance(factors, 1)
        return t0.since(), factors


def lam(setup: bf.Setup, proto: bool, factors: dict[str, LayerFactors]) -> tuple[bf.Span, dict[str, torch.Tensor]]:
    """Time the Λ pass with the bases of ``factors``; returns (seconds, Λ per layer)."""
    run, fresh = bf.make_run(setup, setup.train)
    for name, f in fresh.items():
        f.qa, f.qs, f.tokens = factors[name].qa, factors[name].qs, factors[name].tokens
    patches: list[tuple[Any, str, Any]] = []
    if proto:
        patches += [
            (capture_mod, "_per_token", fast_per_token),
            (fit_mod, "accumulate_squared_grads", buffered_accumulate),
        ]
    with bf.patched(patches), eval_mode(setup.model):
        t0 = bf.Span.start()
        run.ekfac_eigenvalues(fresh)
        seconds = t0.since()
    return seconds, {k: v.lam for k, v in fresh.items() if v.lam is not None}


def rel_err(xs: list[torch.Tensor], ys: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max() / y.abs().max().clamp_min(1e-30)) for x, y in zip(xs, ys, strict=True))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--setups", default="tiny,smollm2")
    p.add_argument("--tiny-seqs", type=int, default=1024)
    p.add_argument("--tiny-len", type=int, default=64)
    p.add_argument("--tiny-batch", type=int, default=32)
    p.add_argument("--tiny-vocab", type=int, default=4096)
    p.add_argument("--smol-seqs", type=int, default=128)
    p.add_argument("--smol-len", type=int, default=48)
    p.add_argument("--smol-batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--write", action="store_true", help="replace this script's section in benchmarks/RESULTS.md")
    args = p.parse_args()
    if args.quick:
        args.tiny_seqs, args.tiny_len, args.tiny_batch = 64, 32, 16
        args.smol_seqs, args.smol_len, args.smol_batch = 16, 32, 8
        args.repeats = 1
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    env = bf.environment()
    lines = [
        "| setup | sequences × tokens | batch | floor (s) | covariance now → prototype (s) "
        "| cov / floor now → proto, wall (CPU) | Λ now → prototype (s) | Λ / floor now → proto, wall (CPU) "
        "| max rel. diff (A,S / Λ) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in args.setups.split(","):
        setup = {"tiny": bf.tiny_setup, "smollm2": bf.smollm2_setup}[name](args)
        warm = bf.Setup(
            setup.name, "", setup.model, setup.task, bf._subset(setup.train, 2 * setup.batch_size), setup.batch_size
        )
        for proto in (False, True):
            _, f = covariance(warm, proto, [])
            lam(warm, proto, f)
        bf.floor_pass(warm, warm.train)
        t: dict[str, list[bf.Span]] = {k: [] for k in ("floor", "cov0", "cov1", "lam0", "lam1")}
        for r in range(args.repeats):
            t["floor"].append(bf.timed(lambda s=setup: bf.floor_pass(s, s.train)))
            seen0: list[torch.Tensor] = []
            seen1: list[torch.Tensor] = []
            c0, f0 = covariance(setup, False, seen0)
            c1, _ = covariance(setup, True, seen1)
            l0, lam0 = lam(setup, False, f0)
            l1, lam1 = lam(setup, True, f0)
            for key, v in (("cov0", c0), ("cov1", c1), ("lam0", l0), ("lam1", l1)):
                t[key].append(v)
            print(
                f"[{name}] repeat {r + 1}, wall (CPU): floor {bf._ws(t['floor'][-1])}, cov {bf._ws(c0)} → "
                f"{bf._ws(c1)}, Λ {bf._ws(l0)} → {bf._ws(l1)}",
                file=sys.stderr,
                flush=True,
            )
        err_cov = rel_err(seen1, seen0)
        err_lam = rel_err(list(lam1.values()), [lam0[k] for k in lam1])
        w = {k: min(x.wall for x in v) for k, v in t.items()}
        c = {k: min(x.cpu for x in v) for k, v in t.items()}

        def ratio(key: str, w: dict[str, float] = w, c: dict[str, float] = c) -> str:
            return f"{w[key] / w['floor']:.2f}× ({c[key] / c['floor']:.2f}×)"

        n, tok = setup.shape
        lines.append(
            f"| {name} | {n} × {tok} | {setup.batch_size} | {w['floor']:.2f} | {w['cov0']:.2f} → {w['cov1']:.2f} "
            f"| {ratio('cov0')} → **{ratio('cov1')}** | {w['lam0']:.2f} → {w['lam1']:.2f} "
            f"| {ratio('lam0')} → **{ratio('lam1')}** | {err_cov:.1e} / {err_lam:.1e} |"
        )
    env["load average (1, 5, 15 min) at end"] = bf.load_average()
    cmd = " ".join(shlex.quote(a) for a in [".venv/bin/python", "benchmarks/bench_fit_prototype.py", *sys.argv[1:]])
    text = "\n".join(
        [
            "## Prototype rewrites of the fitting passes (`benchmarks/bench_fit_prototype.py`)\n",
            f"Command: `{cmd}`\n",
            "\n".join(f"- {k}: {v}" for k, v in env.items()) + "\n",
            f"Prototype = upper-triangle `addmm_` covariances ({TRI_BLOCKS}×{TRI_BLOCKS} blocks), a reused output "
            "buffer for the per-sequence Λ products and no mask multiplication for unpadded batches, on top of the "
            "engine at the time of the run; eigendecompositions stubbed (identity bases) in all runs. "
            f"Best of {args.repeats} (wall-clock; process CPU time in parentheses); same setups as `bench_fit.py` "
            "(see there), sizes as in the table.\n",
            "\n".join(lines) + "\n",
        ]
    )
    print(text)
    if args.write:
        bf.write_results(text, key="bench_fit_prototype")


if __name__ == "__main__":
    main()
