"""Speed of the EK-FAC fitting passes against the floor of a plain training step, side by side in one run.

For each setup this measures, on the same data and batch size:

- (a) floor: a forward + ``loss.backward()`` of the summed next-token NLL with parameter gradients (a training
  step without the optimizer; ``.grad`` is reset to None before each batch, as ``zero_grad()`` does);
- (b) covariance pass: per-token A and S covariances with labels sampled from the model (true Fisher), i.e.
  ``_Run.covariance`` without its final float64 eigendecompositions (timed apart as "eigh");
- (c) Λ pass: the EK-FAC eigenvalue correction on per-sequence gradients in the fitted eigenbases
  (``_Run.ekfac_eigenvalues``).

Setups (defaults are the sizes of the speed issue):

1. ``tiny``: a random-init float32 Llama (4 layers, hidden 256, MLP 1024, 4 heads, vocab 4096), 2048 random-token
   sequences × 64 tokens, batch 32, MLP layers tracked;
2. ``smollm2``: SmolLM2-135M-Instruct (the built-in, de-quantized to float32), its 90 MLP linears (30 blocks),
   256 KJV sequences × 48 tokens (verses packed end to end), batch 8.

Each measurement is warmed up once on the first two batches, then the three passes are repeated in turn
(floor, covariance, Λ, floor, …) so that background load hits them alike; the table reports the best of the
repeats (min: the least disturbed run on a shared machine) and the per-repeat times. ``--profile`` adds one
instrumented run of each pass with timers around its stages (forward, label sampling, backward, covariance
matmuls, rotations, contractions, …).

    .venv/bin/python benchmarks/bench_fit.py                 # full sizes (several minutes, 1 thread)
    .venv/bin/python benchmarks/bench_fit.py --quick         # smoke run (seconds)
    .venv/bin/python benchmarks/bench_fit.py --profile --write   # + stage breakdown, recorded in RESULTS.md
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

import influencer
from influencer import capture as capture_mod
from influencer.curvature import linalg as linalg_mod
from influencer.curvature import sums as fit_mod  # the passes and their kernels (sums.py since the split)
from influencer.curvature.core import LayerFactors
from influencer.layers import select_layers
from influencer.passes import eval_mode
from influencer.tasks import CausalLM

from benchkit import (
    RESULTS,
    SEED,
    Setup,
    Span,
    Timers,
    environment,
    floor_pass,
    full_rows,
    load_average,
    patched,
    random_rows,
    smollm2_packed,
    subset,
    tiny_llama,
    with_rest,
    write_results,
)

TARGET_COV, TARGET_LAM = 1.2, 1.3  # Λ: issue 19 (was 1.5)


# ------------------------------------------------------------------------------------------------ setups


def tiny_setup(args: argparse.Namespace) -> Setup:
    model, desc = tiny_llama(args.tiny_vocab, args.tiny_len)
    ids = random_rows(args.tiny_vocab, args.tiny_seqs, args.tiny_len)
    return Setup("tiny", desc, model, CausalLM(pad_token_id=0), full_rows(ids), args.tiny_batch)


def smollm2_setup(args: argparse.Namespace) -> Setup:
    return smollm2_packed(args.smol_seqs, args.smol_len, args.smol_batch)[1]


# ------------------------------------------------------------------------------------------------ passes


def make_run(
    setup: Setup, train: dict[str, torch.Tensor], precision: str = "float32"
) -> tuple[Any, dict[str, LayerFactors]]:
    """The engine's fit state (``_Run``) and empty factors, exactly as ``fit_curvature`` builds them."""
    tracked = select_layers(setup.model, setup.layers)
    dataset = setup.task.as_dataset(train)
    factors = {x.name: LayerFactors(x.name, x.kind, x.d_out, x.d_in, x.bias) for x in tracked}
    run = fit_mod._Run(setup.model, setup.task, tracked, dataset, setup.batch_size, "sampled", SEED, False, precision)
    return run, factors


def covariance_pass(
    setup: Setup, train: dict[str, torch.Tensor], real_eigh: bool = True
) -> tuple[Span, Span, dict[str, LayerFactors]]:
    """(b) → (pass time excluding eigh, eigh time, fitted factors)."""
    run, factors = make_run(setup, train)
    eig = Timers()
    stub = (lambda f: eig.wrap("eigh", f)) if real_eigh else (lambda f: _identity_eigh)
    with patched([(fit_mod, "eigh_blocks", stub)]), eval_mode(setup.model):
        t0 = Span.start()
        run.covariance(factors, 1)
        total = t0.since()
    return total - eig.span("eigh"), eig.span("eigh"), factors


def lambda_pass(
    setup: Setup, train: dict[str, torch.Tensor], factors: dict[str, LayerFactors], precision: str = "float32"
) -> Span:
    """(c) the EK-FAC Λ pass given fitted eigenbases → time (``precision="bfloat16"``: rotations and
    per-sequence products in bf16, as ``fit_curvature(precision="bfloat16")``)."""
    run, _ = make_run(setup, train, precision)
    with eval_mode(setup.model):
        t0 = Span.start()
        run.ekfac_eigenvalues(factors)
        return t0.since()


def lambda_error(factors: dict[str, LayerFactors], reference: dict[str, Any]) -> tuple[float, float]:
    """(mean, max) over every layer's entries of |Λ − Λ_ref| / (Λ_ref + λ), λ = 0.1 × mean(Λ_ref) (the default
    damping): the error of ``factors``' Λ as the damped inverse sees it."""
    errs = []
    for name, f in factors.items():
        ref = reference[name].double()
        errs.append(((f.lam.double() - ref).abs() / (ref + 0.1 * ref.mean())).flatten())
    e = torch.cat(errs)
    return float(e.mean()), float(e.max())


def _identity_eigh(blocks: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Stand-in for ``eigh_blocks`` in warm-ups and profiles: identity bases (the passes' cost does not depend
    on the basis values), so the one-off float64 eigendecompositions are timed only in the measured repeats."""
    return (
        [torch.ones(len(c), dtype=torch.float64) for c in blocks],
        [torch.eye(len(c), dtype=torch.float64) for c in blocks],
    )


def timed(fn: Callable[[], Any]) -> Span:
    t0 = Span.start()
    fn()
    return t0.since()


@dataclass
class Measurement:
    floor: list[Span] = field(default_factory=list)
    cov: list[Span] = field(default_factory=list)
    eigh: list[Span] = field(default_factory=list)
    lam: list[Span] = field(default_factory=list)
    lam_bf16: list[Span] = field(default_factory=list)
    bf16_error: tuple[float, float] | None = None  # (mean, max) of |Λ_bf16 − Λ| / (Λ + λ), the last repeat
    factors: dict[str, LayerFactors] | None = None  # from the last repeat
    end_to_end: Span | None = None
    profile: dict[str, dict[str, float]] | None = None
    torch_profile: dict[str, str] | None = None


def measure(setup: Setup, repeats: int, log: Callable[[str], None]) -> Measurement:
    warm = subset(setup.train, min(len(setup.train["input_ids"]), 2 * setup.batch_size))
    floor_pass(setup, warm)
    _, _, warm_factors = covariance_pass(setup, warm, real_eigh=False)
    lambda_pass(setup, warm, warm_factors)
    lambda_pass(setup, warm, warm_factors, "bfloat16")
    m = Measurement()
    for r in range(repeats):
        m.floor.append(timed(lambda: floor_pass(setup, setup.train)))
        cov, eigh, factors = covariance_pass(setup, setup.train)
        m.cov.append(cov)
        m.eigh.append(eigh)
        m.lam.append(lambda_pass(setup, setup.train, factors))
        lam32 = {name: f.lam for name, f in factors.items()}
        m.lam_bf16.append(lambda_pass(setup, setup.train, factors, "bfloat16"))
        m.bf16_error = lambda_error(factors, lam32)
        for name, f in factors.items():  # the float32 Λ stays the repeat's result
            f.lam = lam32[name]
        m.factors = factors
        log(
            f"  [{setup.name}] repeat {r + 1}/{repeats} wall (CPU): floor {_ws(m.floor[-1])}, covariance "
            f"{_ws(cov)} + eigh {_ws(eigh)}, Λ {_ws(m.lam[-1])}, Λ bf16 {_ws(m.lam_bf16[-1])}"
        )
    return m


def _ws(x: Span) -> str:
    return f"{x.wall:.2f} ({x.cpu:.2f}) s"


# ------------------------------------------------------------------------------------------------ profile


def profile_setup(setup: Setup, factors: dict[str, LayerFactors]) -> dict[str, dict[str, float]]:
    """One instrumented run of each pass → {pass: {stage: CPU seconds}} (stages are exclusive; they sum to total).

    The covariance run skips the eigendecompositions (timed in the table); the Λ run uses ``factors``."""
    out: dict[str, dict[str, float]] = {}
    t = Timers()
    total = timed(lambda: floor_pass(setup, setup.train, t)).cpu
    out["floor"] = with_rest(total, dict(t.cpu), "rest")
    for name in ("covariance", "lambda"):
        t = Timers()
        patches = [
            (fit_mod, "batches", lambda f, t=t: t.wrap_iter("data (collate)", f)),
            (setup.task, "forward", lambda f, t=t: t.wrap("forward (+ capture hooks)", f)),
            (setup.task, "sampled_loss", lambda f, t=t: t.wrap("loss (sample labels + NLL)", f)),
            (capture_mod.Capture, "gradients", lambda f, t=t: t.wrap("_gradients", f)),
            (capture_mod, "_per_token", lambda f, t=t: t.wrap("_per_token", f)),
            (fit_mod, "block_covariance", lambda f, t=t: t.wrap("covariance matmuls (xᵀx)", f)),
            (fit_mod, "eigh_blocks", lambda f: _identity_eigh),
            (linalg_mod, "rotate", lambda f, t=t: t.wrap("_rotate_inner", f)),
            # the Λ kernel: per-sequence matmul + fused square-accumulate (since 87d8ad3) or, before, a batched
            # bmm returned to the pass loop (which squared and summed it); only one of them exists
            (fit_mod, "accumulate_squared_grads", lambda f, t=t: t.wrap("_accumulate", f)),
            (fit_mod, "rotated_per_example_grads", lambda f, t=t: t.wrap("_rotated", f)),
            (fit_mod, "rotate", lambda f, t=t: t.wrap("_rotate_outer", f)),  # shared ā Q_A, since 87d8ad3
        ]
        optional = {
            "influencer.curvature.sums." + x
            for x in ("accumulate_squared_grads", "rotated_per_example_grads", "rotate")
        }
        run, fresh = make_run(setup, setup.train)
        with patched(patches) as missing, eval_mode(setup.model):
            t0 = Span.start()
            if name == "covariance":
                run.covariance(fresh, 1)
            else:
                run.ekfac_eigenvalues(factors)
            total = t0.since().cpu
        s = dict(t.cpu)
        packaging = s.pop("_per_token", 0.0)
        s["backward (autograd.grad to layer outputs)"] = s.pop("_gradients", 0.0) - packaging
        s["capture packaging (mask ×, bias column)"] = packaging
        inner, outer = s.pop("_rotate_inner", 0.0), s.pop("_rotate_outer", 0.0)
        kernel_new, kernel_old = s.pop("_accumulate", None), s.pop("_rotated", None)
        if name == "lambda":
            s["rotation into eigenbasis (Q_Sᵀg, Q_Aᵀā)"] = inner + outer
            if kernel_new is not None:
                s["per-sequence contraction + square-accumulate (mm + addcmul_)"] = kernel_new - inner
            if kernel_old is not None:
                s["contraction (bmm Σ_t g̃ ãᵀ)"] = kernel_old - inner
        missing = [m for m in missing if m not in optional]
        if missing:
            s["(not timed, missing: " + ", ".join(missing) + ")"] = 0.0
        rest = "rest of the Λ loop (square + sum before 87d8ad3)" if name == "lambda" else "rest (accumulate, scale)"
        out[name] = with_rest(total, s, rest)
    return out


def torch_profile_setup(setup: Setup, n_batches: int, rows: int) -> dict[str, str]:
    """torch.profiler operator tables (self CPU time) over the first ``n_batches`` batches of each pass."""
    from torch.profiler import ProfilerActivity, profile

    sub = subset(setup.train, n_batches * setup.batch_size)
    tables = {}
    run, factors = make_run(setup, sub)
    stub = [(fit_mod, "eigh_blocks", lambda f: _identity_eigh)]  # eigh is timed in the table, not here
    jobs: list[tuple[str, Callable[[], Any]]] = [
        ("floor", lambda: floor_pass(setup, sub)),
        ("covariance (eigh excluded)", lambda: run.covariance(factors, 1)),
        ("lambda", lambda: make_run(setup, sub)[0].ekfac_eigenvalues(factors)),
    ]
    for name, job in jobs:
        with patched(stub), eval_mode(setup.model), profile(activities=[ProfilerActivity.CPU]) as prof:
            job()
        tables[name] = prof.key_averages().table(
            sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=40
        )
    return tables


# ------------------------------------------------------------------------------------------------ report


def _mark(ratio: float, target: float) -> str:
    return f"{ratio:.2f}× {'✅' if ratio <= target else '❌'}"


def results_table(rows: list[tuple[Setup, Measurement]], repeats: int) -> str:
    head = (
        f"| setup | sequences × tokens | batch | tracked | floor (s) | covariance (s) | Λ (s) | Λ bf16 (s) | eigh (s) "
        f"| covariance / floor (target ≤ {TARGET_COV}) | Λ / floor (target ≤ {TARGET_LAM}) "
        f"| Λ bf16 / floor (target ≤ {TARGET_LAM}) | (covariance + eigh) / floor | CPU-time ratios: covariance, Λ, "
        "Λ bf16 |\n"
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    lines = []
    for s, m in rows:
        n, t = s.shape
        f, c, lam, lb, e = (min(x.wall for x in xs) for xs in (m.floor, m.cov, m.lam, m.lam_bf16, m.eigh))
        fc, cc, lc, bc = (min(x.cpu for x in xs) for xs in (m.floor, m.cov, m.lam, m.lam_bf16))
        n_layers = len(select_layers(s.model, s.layers))
        lines.append(
            f"| {s.name} | {n} × {t} | {s.batch_size} | {s.layers} ({n_layers} linears) | {f:.2f} | {c:.2f} "
            f"| {lam:.2f} | {lb:.2f} | {e:.2f} | {_mark(c / f, TARGET_COV)} | {_mark(lam / f, TARGET_LAM)} "
            f"| {_mark(lb / f, TARGET_LAM)} | {(c + e) / f:.2f}× | {cc / fc:.2f}×, {lc / fc:.2f}×, {bc / fc:.2f}× |"
        )
    errors = [
        f"{s.name}: mean {m.bf16_error[0]:.1e}, max {m.bf16_error[1]:.1e}" for s, m in rows if m.bf16_error is not None
    ]
    note = (
        "\nΛ bf16 against Λ (float32), |Λ_bf16 − Λ| / (Λ + λ) with the default λ = 0.1 × mean(Λ) over every "
        f"entry: {'; '.join(errors)}.\n"
        f"\nWall-clock times, best (min) of {repeats} repeat(s) after one warm-up; ratios divide best by best. "
        "Covariance excludes the one-off float64 eigendecompositions (column eigh, independent of N). The last "
        "column divides best process CPU times instead: it leaves out time spent waiting for a core while other "
        "processes ran, so it is the steadier ratio on a shared machine (see the load averages above).\n"
    )
    return head + "\n".join(lines) + "\n" + note


def repeats_table(rows: list[tuple[Setup, Measurement]]) -> str:
    out = [
        "| setup | floor | covariance | eigh | Λ | Λ bf16 | median cov / floor | median Λ / floor |",
        "|---|---|---|---|---|---|---:|---:|",
    ]
    for s, m in rows:
        fmt = lambda xs: ", ".join(f"{x.wall:.2f} ({x.cpu:.2f})" for x in xs)  # noqa: E731
        mf = statistics.median(x.wall for x in m.floor)
        out.append(
            f"| {s.name} | {fmt(m.floor)} | {fmt(m.cov)} | {fmt(m.eigh)} | {fmt(m.lam)} | {fmt(m.lam_bf16)} "
            f"| {statistics.median(x.wall for x in m.cov) / mf:.2f}× "
            f"| {statistics.median(x.wall for x in m.lam) / mf:.2f}× |"
        )
    return "\n".join(out) + "\n"


def profile_table(setup: Setup, m: Measurement) -> str:
    assert m.profile is not None
    floor_total = m.profile["floor"]["total"]
    out = [
        f"**{setup.name}** (one instrumented run per pass, process CPU seconds; share of that pass, and seconds ÷ "
        "floor total)\n"
    ]
    for name, label in (("floor", "floor"), ("covariance", "covariance pass"), ("lambda", "Λ pass")):
        stages = m.profile[name]
        total = stages["total"]
        out.append(f"| {label} stage | CPU s | % of pass | × floor |\n|---|---:|---:|---:|")
        for k, v in stages.items():
            if k == "total":
                continue
            out.append(f"| {k} | {v:.2f} | {100 * v / total:.1f}% | {v / floor_total:.3f} |")
        out.append(f"| **total** | **{total:.2f}** | 100% | **{total / floor_total:.2f}** |\n")
    return "\n".join(out) + "\n"


def report(args: argparse.Namespace, env: dict[str, str], rows: list[tuple[Setup, Measurement]]) -> str:
    cmd = " ".join(shlex.quote(a) for a in [".venv/bin/python", "benchmarks/bench_fit.py", *sys.argv[1:]])
    parts = [
        "## Fitting passes vs a plain training step (`benchmarks/bench_fit.py`)\n",
        f"Command: `{cmd}`\n",
        "\n".join(f"- {k}: {v}" for k, v in env.items()) + "\n",
        "Setups:\n",
        "\n".join(f"- **{s.name}**: {s.description}; layers `{s.layers}`, true Fisher" for s, _ in rows) + "\n",
        "Floor = forward + `loss.backward()` of the summed next-token NLL with parameter gradients. "
        "Covariance = pass 1 (per-token A, S with sampled labels). Λ = pass 2 (EK-FAC eigenvalue correction, "
        "per-sequence gradients in the fitted eigenbases); Λ bf16 = the same pass with "
        "`fit_curvature(precision='bfloat16')` (rotations and per-sequence products in bf16, float32 sums). "
        "Both passes call `autograd.grad` on the tracked layer outputs only (no parameter gradients).\n",
        results_table(rows, args.repeats),
        "Every repeat, wall (CPU) seconds:\n",
        repeats_table(rows),
    ]
    if any(m.end_to_end is not None for _, m in rows):
        parts.append(
            "End to end `influencer.fit_curvature(strategy='ekfac', fisher='true')`, one run: "
            + ", ".join(
                f"{s.name} {m.end_to_end.wall:.2f} s ({m.end_to_end.wall / min(x.wall for x in m.floor):.2f}× floor)"
                for s, m in rows
                if m.end_to_end is not None
            )
            + "\n"
        )
    if any(m.profile for _, m in rows):
        parts.append("### Where the time goes\n")
        parts.extend(profile_table(s, m) for s, m in rows if m.profile)
    for s, m in rows:
        for name, table in (m.torch_profile or {}).items():
            parts.append(f"torch.profiler, {s.name} / {name} (first {args.torch_profile} batches):\n")
            parts.append("```\n" + table + "\n```\n")
    return "\n".join(parts)


# ------------------------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--setups", default="tiny,smollm2", help="comma-separated: tiny, smollm2 (default both)")
    p.add_argument("--tiny-seqs", type=int, default=2048)
    p.add_argument("--tiny-len", type=int, default=64)
    p.add_argument("--tiny-batch", type=int, default=32)
    p.add_argument("--tiny-vocab", type=int, default=4096)
    p.add_argument("--smol-seqs", type=int, default=256)
    p.add_argument("--smol-len", type=int, default=48)
    p.add_argument("--smol-batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per pass after one warm-up (best is kept)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument("--profile", action="store_true", help="add one instrumented run per pass (stage breakdown)")
    p.add_argument("--torch-profile", type=int, default=0, metavar="BATCHES", help="torch.profiler op tables")
    p.add_argument("--end-to-end", action="store_true", help="also time influencer.fit_curvature once")
    p.add_argument("--quick", action="store_true", help="tiny sizes and one repeat: a smoke run")
    p.add_argument("--write", action="store_true", help=f"replace this benchmark's section in {RESULTS.name}")
    args = p.parse_args(argv)
    if args.quick:
        args.tiny_seqs, args.tiny_len, args.tiny_batch = 64, 32, 16
        args.smol_seqs, args.smol_len, args.smol_batch = 16, 32, 8
        args.repeats = 1
    if args.repeats < 1:
        p.error("--repeats must be ≥ 1")
    unknown = set(args.setups.split(",")) - {"tiny", "smollm2"}
    if unknown:
        p.error(f"unknown setup(s) {sorted(unknown)}; choose from tiny, smollm2")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    env = environment()
    log(f"threads={torch.get_num_threads()} torch={torch.__version__} cpu={env['cpu']}")
    builders = {"tiny": tiny_setup, "smollm2": smollm2_setup}
    rows: list[tuple[Setup, Measurement]] = []
    for name in args.setups.split(","):
        t0 = time.perf_counter()
        setup = builders[name](args)
        log(f"[{name}] built in {time.perf_counter() - t0:.1f} s: {setup.description}")
        m = measure(setup, args.repeats, log)
        if args.end_to_end:
            m.end_to_end = timed(
                lambda s=setup: influencer.fit_curvature(
                    s.model, s.task, s.train, layers=s.layers, batch_size=s.batch_size, progress=False
                )
            )
            log(f"  [{name}] fit_curvature end to end {_ws(m.end_to_end)}")
        if args.profile:
            assert m.factors is not None
            m.profile = profile_setup(setup, m.factors)
            log(f"  [{name}] profiled")
        if args.torch_profile:
            m.torch_profile = torch_profile_setup(setup, args.torch_profile, 15)
        rows.append((setup, m))
    env["load average (1, 5, 15 min) at end"] = load_average()
    text = report(args, env, rows)
    print(text)
    if args.write:
        write_results(text, "bench_fit")
        log(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
