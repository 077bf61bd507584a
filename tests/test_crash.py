"""Crash safety: SIGKILL a resumable fit + scan at random moments, resume, and get the uninterrupted results
(a short run of scripts/kill_test.py); a resumable fit equals a plain one; interrupted checkpoints resume."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

import influencer as inf

_SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _kill_test(name: str = "kill_test"):
    spec = importlib.util.spec_from_file_location(name, _SCRIPTS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sigkill_at_random_moments_then_resume(tmp_path: Path) -> None:
    summary = _kill_test().run_kill_test(3, n_train=1200, seed=1, base=tmp_path, log=lambda *_: None)
    print(f"\nkill test: {summary}")
    assert summary["kills"] == 3


def test_sigkill_the_command_line_fit_then_rerun(tmp_path: Path) -> None:
    """scripts/kill_cli_fit.py (≥ 20 kills when run by hand; 3 here): the same `influencer fit` command,
    run again after a SIGKILL, finishes with the uninterrupted run's factors bit for bit."""
    pytest.importorskip("transformers")
    summary = _kill_test("kill_cli_fit").run_kill_test(3, seed=2, base=tmp_path, log=lambda *_: None)
    print(f"\ncommand-line kill test: {summary}")
    assert summary["kills"] == 3 and summary["rounds"] >= 1


def test_resumable_fit_checkpoints_and_continues(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kt = _kill_test()
    model, train, _ = kt.problem(60)
    task = inf.CausalLM()
    plain = inf.fit_curvature(model, task, train, layers=r"blocks\.", batch_size=8, progress=False)
    run = tmp_path / "fit"
    # an interrupted covariance stage: the first chunks done, then "killed" (an exception after 3 checkpoints)
    from influencer.curvature import fit as fit_mod

    saves = []
    original = fit_mod._Checkpoint.save

    def save_then_die(self, sums, next_):
        original(self, sums, next_)
        saves.append(next_)
        if len(saves) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(fit_mod._Checkpoint, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        inf.fit_curvature(
            model, task, train, layers=r"blocks\.", batch_size=8, progress=False, out_dir=run, checkpoint_every=10
        )
    monkeypatch.undo()
    assert saves == [10, 20, 30]
    manifest = json.loads((run / "partial" / "covariance.r0of1.json").read_text())
    assert manifest["next"] == 30 and manifest["sums"]["sequences"] == 30
    assert not (run / "lock.json").read_text()  # released (emptied) on the way out
    resumed = inf.fit_curvature(
        model,
        task,
        train,
        layers=r"blocks\.",
        batch_size=8,
        progress=False,
        out_dir=run,
        checkpoint_every=10,
        damping_factor=0.2,
    )
    assert not (run / "partial").exists()
    assert json.loads((run / "fit.json").read_text())["done"] == ["covariance", "eigenvalues", "curvature"]
    ref = plain.with_damping(damping_factor=0.2)
    gen = torch.Generator().manual_seed(0)
    for name, f in ref.layers.items():
        g = resumed.layers[name]
        assert f.tokens == g.tokens and abs(f.damping - g.damping) <= 1e-4 * f.damping
        v = torch.randn(2, *f.shape, generator=gen)
        x, y = resumed.precondition(name, v), ref.precondition(name, v)
        assert float((x - y).norm() / y.norm()) < 1e-3  # float32 model, other batch boundaries
    # a finished run directory returns the saved curvature at once, with the damping asked for now
    again = inf.fit_curvature(
        model,
        task,
        train,
        layers=r"blocks\.",
        batch_size=8,
        progress=False,
        out_dir=run,
        checkpoint_every=10,
        n_train=1000,
    )
    assert again.n_train == 1000
    for name, f in again.layers.items():
        assert torch.equal(f.lam, resumed.layers[name].lam)
