"""The README's Python quick start runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quick_start_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    text = README.read_text()
    section = text.split("## Quick start (Python)", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None, "README lost its quick start block"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code.group(1), "README quick start", "exec"), namespace)
    out = capsys.readouterr().out
    assert "torch.Size([3, 200])" in out
    assert "dict_keys(['0', '2'])" in out
    s = namespace["s"]
    assert (tmp_path / "run" / "curvature" / "manifest.json").is_file()
    assert s.total.shape == (3, 200)
    assert bool((namespace["self_inf"] >= 0).all())


@pytest.mark.slow
def test_scan_and_prefilter_examples_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = README.read_text()
    section = text.split("## Many queries, one pass: `scan`", 1)[1].split("## Conventions", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 2
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README scan example", "exec"), namespace)
    result, filtered = namespace["result"], namespace["filtered"]
    assert result.top(0)[0].index == 0  # Genesis 1:1 is the top hit for its own continuation
    assert filtered.meta["prefiltered"] and len(filtered.overlap(result)) == 1
