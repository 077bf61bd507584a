"""Batch size, padding and masking invariance; Conv1D ≡ Linear; blocks; save/load and model checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import reference as ref
import torch
import zoo

import influencer as inf
from influencer.ledger import ResumeConflictError

TOL = {"rtol": 1e-9, "atol": 1e-12}


def _fit_and_score(model, task, train, queries, *, batch_size, strategy="ekfac", fisher="true", **kw):
    curv = inf.fit_curvature(
        model, task, train, strategy=strategy, fisher=fisher, batch_size=batch_size, progress=False, **kw
    )
    scores = inf.pairwise_scores(model, task, curv, queries, train, batch_size=batch_size, progress=False)
    return curv, scores


def _assert_same_factors(c1: inf.Curvature, c2: inf.Curvature) -> None:
    assert c1.layer_names == c2.layer_names
    for name in c1.layer_names:
        f1, f2 = c1.layers[name], c2.layers[name]
        assert f1.tokens == f2.tokens
        torch.testing.assert_close(f1.lam, f2.lam, **TOL)
        assert f1.damping == pytest.approx(f2.damping, rel=1e-9)


@pytest.mark.parametrize("strategy", ["diagonal", "kfac", "ekfac"])
def test_batch_size_invariance_llama_true_fisher(strategy: str) -> None:
    model = zoo.tiny_llama()
    ids = zoo.token_data(12, t=7)
    queries = {"input_ids": zoo.token_data(3, t=6, seed=1), "prompt_length": 3}
    task = inf.CausalLM()
    ref_c, ref_s = _fit_and_score(model, task, ids, queries, batch_size=12, strategy=strategy)
    for bs in (1, 5):
        c, s = _fit_and_score(model, task, ids, queries, batch_size=bs, strategy=strategy)
        _assert_same_factors(ref_c, c)
        torch.testing.assert_close(s.total, ref_s.total, **TOL)


def test_padding_and_masked_tokens_contribute_nothing() -> None:
    model = zoo.tiny_llama()
    task = inf.CausalLM()
    lengths = [5, 9, 3, 7, 8, 4]
    seqs = [zoo.token_data(1, t=n, seed=10 + i)[0] for i, n in enumerate(lengths)]
    queries = [{"input_ids": zoo.token_data(1, t=6, seed=99)[0], "prompt_length": 2}]
    # (1) variable-length list, padded per batch
    c1, s1 = _fit_and_score(model, task, seqs, queries, batch_size=4)
    # (2) one padded matrix with extra padding columns, garbage ids in the padding
    t_max = 12
    ids = torch.randint(0, 64, (len(seqs), t_max), generator=torch.Generator().manual_seed(5))
    mask = torch.zeros(len(seqs), t_max, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = 1
    c2, s2 = _fit_and_score(model, task, {"input_ids": ids, "attention_mask": mask}, queries, batch_size=6)
    _assert_same_factors(c1, c2)
    torch.testing.assert_close(s1.total, s2.total, **TOL)
    for name in c1.layer_names:
        assert c1.layers[name].tokens == sum(lengths)
    # (3) loss_mask removes targets: masking every target gives zero training gradients → zero scores
    none = {"input_ids": ids, "attention_mask": mask, "loss_mask": torch.zeros_like(mask)}
    s3 = inf.pairwise_scores(model, task, c1, queries, none, progress=False)
    assert float(s3.total.abs().max()) == 0.0


def test_conv1d_equals_linear() -> None:
    pair = zoo.ConvLinearPair()
    x, y = zoo.regression_data(30, d_in=4, d_out=3)
    task = inf.Regression()
    queries = (x[:4] * 1.1, y[:4])
    for strategy in ("identity", "diagonal", "kfac", "ekfac"):
        cc, sc = _fit_and_score(pair.conv, task, (x, y), queries, batch_size=8, strategy=strategy)
        cl, sl = _fit_and_score(pair.linear, task, (x, y), queries, batch_size=8, strategy=strategy)
        assert cc.layers["2"].kind == "conv1d" and cl.layers["2"].kind == "linear"
        if strategy != "identity":
            _assert_same_factors(cc, cl)
        torch.testing.assert_close(sc.total, sl.total, **TOL)
        for name in pair.names:
            torch.testing.assert_close(sc.per_layer[name], sl.per_layer[name], **TOL)


def test_unblocked_factors_are_the_full_covariances_and_blocks_their_diagonal_blocks() -> None:
    """blocks=1 (the default) gives the full A and S of the definitions (reference.kronecker_factors: brute force,
    own hooks); blocks=2 gives exactly their diagonal blocks, at about half the memory of the bases."""
    model = zoo.mlp(d_in=7, hidden=12, d_out=4)
    x, y = zoo.regression_data(50, d_in=7, d_out=4)
    task = inf.Regression()
    full = inf.fit_curvature(model, task, (x, y), strategy="kfac", fisher="empirical", progress=False)
    want = ref.kronecker_factors(model, task, (x, y), full.layer_names)  # the empirical Fisher's labels
    two = inf.fit_curvature(model, task, (x, y), strategy="kfac", fisher="empirical", blocks=2, progress=False)
    for name, f in full.layers.items():
        b = two.layers[name]
        assert len(f.qa) == len(f.qs) == 1 and len(b.qa) == len(b.qs) == 2
        for bases, eig, cov in ((f.qa, f.eig_a, want[name].a), (f.qs, f.eig_s, want[name].s)):
            torch.testing.assert_close(bases[0] @ torch.diag(eig) @ bases[0].T, cov, rtol=1e-10, atol=1e-12)
        # each block's covariance equals the corresponding diagonal block of the full covariance
        for bases, eig, cov in ((b.qa, b.eig_a, want[name].a), (b.qs, b.eig_s, want[name].s)):
            start = 0
            for q in bases:
                n = q.shape[0]
                block = q @ torch.diag(eig[start : start + n]) @ q.T
                torch.testing.assert_close(block, cov[start : start + n, start : start + n], rtol=1e-10, atol=1e-12)
                start += n
            assert start == len(cov)
        ratio = f.basis_nbytes() / b.basis_nbytes()
        assert ratio == pytest.approx(2.0, rel=0.15)
    # block-diagonal EK-FAC runs and scores correlate with the full one
    queries = (x[:5], y[:5])
    s_full = inf.pairwise_scores(
        model, task, inf.fit_curvature(model, task, (x, y), progress=False), queries, (x, y), progress=False
    )
    s_two = inf.pairwise_scores(
        model, task, inf.fit_curvature(model, task, (x, y), blocks=3, progress=False), queries, (x, y), progress=False
    )
    r = torch.corrcoef(torch.stack([s_full.total.flatten(), s_two.total.flatten()]))[0, 1]
    assert r > 0.8


def test_blocks_divide_memory_by_o() -> None:
    model = zoo.mlp(d_in=15, hidden=23, d_out=8)  # widths with bias: 16, 24, 24; outputs 23, 23, 8
    x, y = zoo.regression_data(20, d_in=15, d_out=8)
    task = inf.Regression()
    full = inf.fit_curvature(model, task, (x, y), progress=False)
    for o in (2, 4, 8):
        blocked = inf.fit_curvature(model, task, (x, y), blocks=o, progress=False)
        ratio = sum(f.basis_nbytes() for f in full.layers.values()) / sum(
            f.basis_nbytes() for f in blocked.layers.values()
        )
        assert ratio == pytest.approx(o, rel=0.2)
    with pytest.raises(ValueError, match="cannot split"):
        inf.fit_curvature(model, task, (x, y), blocks=9, progress=False)


def test_save_load_roundtrip_and_model_checks(tmp_path: Path) -> None:
    model = zoo.tiny_llama()
    task = inf.CausalLM()
    ids = zoo.token_data(8, t=6)
    queries = {"input_ids": zoo.token_data(2, t=6, seed=3), "prompt_length": torch.tensor([2, 4])}
    curv = inf.fit_curvature(model, task, ids, blocks=2, n_train=1000, progress=False)
    scores = inf.pairwise_scores(model, task, curv, queries, ids, progress=False)
    curv.save(tmp_path / "curv")
    loaded = inf.Curvature.load(tmp_path / "curv", model)
    assert loaded.manifest() == curv.manifest()
    again = inf.pairwise_scores(model, task, loaded, queries, ids, progress=False)
    assert torch.equal(again.total, scores.total)
    assert again.n_train == 1000
    torch.testing.assert_close(again.per_copy, scores.total / 1000)
    # scores round-trip too
    scores.save(tmp_path / "scores")
    back = inf.Scores.load(tmp_path / "scores")
    assert torch.equal(back.total, scores.total) and back.per_layer.keys() == scores.per_layer.keys()
    # same architecture, other weights
    other = zoo.tiny_llama(seed=1)
    with pytest.raises(inf.CurvatureMismatchError, match="weights differ"):
        inf.Curvature.load(tmp_path / "curv", other)
    with pytest.raises(inf.CurvatureMismatchError):
        inf.pairwise_scores(other, task, loaded, queries, ids, progress=False)
    # another architecture
    with pytest.raises(inf.CurvatureMismatchError, match=r"model\.layers\.0\.mlp\.gate_proj"):
        inf.Curvature.load(tmp_path / "curv", zoo.tiny_llama(hidden=8, intermediate=16))
    with pytest.raises(FileNotFoundError, match="no curvature"):
        inf.Curvature.load(tmp_path / "missing", model)


def test_fit_out_dir_refuses_other_settings(tmp_path: Path) -> None:
    """A fit directory made with some settings refuses a call with others (ResumeConflictError naming the first
    differing setting, both values in the message) and is left as it was; the same settings resume it."""
    model = zoo.mlp()
    x, y = zoo.regression_data(20)
    task = inf.Regression()
    out = tmp_path / "fit"
    base = {"strategy": "ekfac", "fisher": "true", "seed": 1, "batch_size": 8, "out_dir": out, "progress": False}
    first = inf.fit_curvature(model, task, (x, y), **base)

    def snapshot() -> dict[str, bytes]:
        return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}

    before = snapshot()
    for change, saved in (
        ({"seed": 2}, 1),
        ({"strategy": "kfac"}, "ekfac"),
        ({"blocks": 2}, 1),
        ({"fisher": "empirical"}, "true"),
        ({"layers": ["0", "4"]}, ["0", "2", "4"]),
    ):
        (setting, asked), *_ = change.items()
        with pytest.raises(ResumeConflictError) as info:
            inf.fit_curvature(model, task, (x, y), **{**base, **change})
        assert (info.value.setting, info.value.saved, info.value.asked) == (setting, saved, asked)
        assert f"{setting}={saved!r}" in str(info.value) and f"{setting}={asked!r}" in str(info.value)
        assert snapshot() == before
    with pytest.raises(ResumeConflictError):  # as many sequences, other values
        inf.fit_curvature(model, task, (x + 1, y), **base)
    assert snapshot() == before
    again = inf.fit_curvature(model, task, (x, y), **base)
    _assert_same_factors(first, again)


def test_with_damping_and_absolute_damping() -> None:
    model = zoo.mlp()
    x, y = zoo.regression_data(20)
    task = inf.Regression()
    curv = inf.fit_curvature(model, task, (x, y), progress=False)
    for _name, f in curv.layers.items():
        assert f.damping == pytest.approx(0.1 * float(f.lam.mean()))
    fixed = curv.with_damping(0.5)
    assert all(f.damping == 0.5 for f in fixed.layers.values())
    direct = inf.fit_curvature(model, task, (x, y), damping=0.5, progress=False)
    s1 = inf.pairwise_scores(model, task, fixed, (x[:2], y[:2]), (x, y), progress=False)
    s2 = inf.pairwise_scores(model, task, direct, (x[:2], y[:2]), (x, y), progress=False)
    torch.testing.assert_close(s1.total, s2.total, **TOL)


class _SometimesSharedInput(torch.nn.Module):
    """Two layers read the same tensor, except in batches of one example, where one reads a copy."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(4, 3).double()
        self.b = torch.nn.Linear(4, 3).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.a(x)) + self.b(x.clone() if len(x) == 1 else x)


def test_layers_sharing_an_input_share_their_eigenbasis() -> None:
    model = zoo.tiny_llama()
    curv = inf.fit_curvature(model, inf.CausalLM(), zoo.token_data(6, t=5), progress=False)
    gate, up = curv.layers["model.layers.0.mlp.gate_proj"], curv.layers["model.layers.0.mlp.up_proj"]
    assert gate.qa is up.qa and gate.qs is not up.qs
    # sharing that holds in some batches only (5 examples in batches of 2, 2, 1) gives the unshared result
    model = _SometimesSharedInput()
    x, y = zoo.regression_data(5, d_in=4, d_out=3)
    shared = inf.fit_curvature(model, inf.Regression(), (x, y), batch_size=2, progress=False)
    apart = inf.fit_curvature(model, inf.Regression(), (x, y), batch_size=1, progress=False)
    assert shared.layers["a"].qa is not shared.layers["b"].qa
    _assert_same_factors(shared, apart)
