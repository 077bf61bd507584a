"""Every bad input and fault through the command line, in one table: each ends with exactly one line
``error: …``, a non-zero exit status, no traceback, nothing written where a new run would go, and the existing run
directory byte-identical (even the damaged ones: a refusal never "repairs" or deletes)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_cli import (
    QUERIES,
    error_line,
    invoke,
    ok,
    snapshot,
    ws,  # noqa: F401  (the shared fixture: a tiny model folder, data and one fitted run)
)

from influencer.data import kjv_verses


@dataclass
class Case:
    """One refused request: ``args(ctx)`` is the command line, ``expect`` a part of its error line."""

    name: str
    args: Callable[[SimpleNamespace], list[object]]
    expect: str
    code: int = 1
    prepare: Callable[[SimpleNamespace], None] = field(default=lambda ctx: None)


def _fit(*extra: object) -> Callable[[SimpleNamespace], list[object]]:
    return lambda c: ["fit", c.ws.model, c.ws.train, "--out", c.new, *extra]


def _scan(*extra: object) -> Callable[[SimpleNamespace], list[object]]:
    return lambda c: ["scan", c.run, "--queries", c.ws.queries, "--no-tokens", *extra]


def _write(name: str, text: str) -> Callable[[SimpleNamespace], None]:
    return lambda c: (c.tmp / name).write_text(text, encoding="utf-8")  # type: ignore[func-returns-value]


def _flip(rel: str, offset: int = -1) -> Callable[[SimpleNamespace], None]:
    def damage(c: SimpleNamespace) -> None:
        path = c.run / rel
        data = bytearray(path.read_bytes())
        data[offset] ^= 0x01
        path.write_bytes(bytes(data))

    return damage


def _edit_manifest(change: Callable[[dict], None]) -> Callable[[SimpleNamespace], None]:
    def edit(c: SimpleNamespace) -> None:  # an edit by hand: valid JSON, the seal left as it was
        path = c.run / "curvature" / "manifest.json"
        m = json.loads(path.read_text())
        change(m)
        path.write_text(json.dumps(m, indent=2))

    return edit


def _negative_damping(m: dict) -> None:
    first = next(iter(m["layers"]))
    m["layers"][first]["damping"] = -1.0


def _write_run(text: str) -> Callable[[SimpleNamespace], None]:
    return lambda c: (c.run / "run.json").write_text(text)  # type: ignore[func-returns-value]


def _weightless_model(c: SimpleNamespace) -> None:
    """A model folder with its config and tokenizer but no weights: loading it would fail."""
    folder = c.tmp / "no-weights"
    shutil.copytree(c.ws.model, folder, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))


def _scanned(c: SimpleNamespace) -> None:
    ok(invoke("scan", c.run, "-p", "In the", "-c", " beginning", "--no-tokens"))


FACTORS = "curvature/factors.safetensors"

CASES = [
    # fit: inputs
    Case("fit-missing-data", lambda c: ["fit", c.ws.model, c.tmp / "nope.jsonl", "--out", c.new], "no such file"),
    Case("fit-missing-model", lambda c: ["fit", c.tmp / "no-model", c.ws.train, "--out", c.new], "does not exist"),
    Case("fit-model-is-a-file", lambda c: ["fit", c.ws.train, c.ws.train, "--out", c.new], "is a file"),
    Case(
        "fit-bad-jsonl",
        lambda c: ["fit", c.ws.model, c.tmp / "bad.jsonl", "--out", c.new],
        "bad.jsonl:2: not valid JSON",
        prepare=_write("bad.jsonl", '{"text": "a"}\n{"text": "b\n'),
    ),
    Case(
        "fit-no-text-field",
        lambda c: ["fit", c.ws.model, c.tmp / "body.jsonl", "--out", c.new],
        "no field 'text'",
        prepare=_write("body.jsonl", '{"body": "x"}\n'),
    ),
    Case(
        "fit-empty-data",
        lambda c: ["fit", c.ws.model, c.tmp / "empty.txt", "--out", c.new],
        "empty.txt",
        prepare=_write("empty.txt", "\n\n"),
    ),
    Case(
        "fit-bad-data-found-before-the-weights-are-read",
        lambda c: ["fit", c.tmp / "no-weights", c.tmp / "body.jsonl", "--out", c.new],
        "no field 'text'",
        prepare=lambda c: (_weightless_model(c), _write("body.jsonl", '{"body": "x"}\n')(c)),  # type: ignore[func-returns-value]
    ),
    Case("fit-truncation-error", _fit("--max-length", "8", "--truncation", "error"), "more than max length 8"),
    # fit: layers, resolved before the weights are read
    Case("fit-layers-empty", _fit("--layers", ""), "is empty"),
    Case("fit-layers-blank", _fit("--layers", "  "), "is empty"),
    Case("fit-layers-unknown-preset", _fit("--layers", "mlpp"), "unknown layer preset 'mlpp'"),
    Case("fit-layers-no-match", _fit("--layers", r"nothing\.here"), "matched no layer"),
    Case("fit-layers-braces-in-regex", _fit("--layers", r"layers\.[0-9]{2}\.mlp"), r"[0-9]{2}"),
    Case("fit-layers-bad-regex", _fit("--layers", "(mlp"), "valid regex"),
    Case("fit-layers-head-by-pattern-only", _fit("--layers", r"^lm_"), "matched no layer"),
    # fit: numbers
    Case("fit-damping-factor-nan", _fit("--damping-factor", "nan"), "--damping-factor must be a finite number"),
    Case("fit-damping-factor-inf", _fit("--damping-factor", "inf"), "--damping-factor must be a finite number"),
    Case("fit-damping-factor-zero", _fit("--damping-factor", "0"), "--damping-factor must be > 0"),
    Case("fit-damping-factor-negative", _fit("--damping-factor", "-0.1"), "--damping-factor must be > 0"),
    Case("fit-damping-nan", _fit("--damping", "nan"), "--damping", code=2),
    Case("fit-damping-inf", _fit("--damping", "inf"), "--damping must be a finite number"),
    Case("fit-damping-negative", _fit("--damping", "-1"), "--damping", code=2),
    Case("fit-batch-size-zero", _fit("--batch-size", "0"), "--batch-size", code=2),
    Case("fit-sequences-zero", _fit("--sequences", "0"), "--sequences", code=2),
    Case("fit-bad-strategy", _fit("--strategy", "nope"), "'nope' is not one of", code=2),
    Case("fit-missing-out", lambda c: ["fit", c.ws.model, c.ws.train], "Missing option '--out'", code=2),
    Case("fit-memory-budget-too-small", _fit("--memory-budget", "1MB"), "would peak at"),
    Case("fit-memory-budget-unreadable", _fit("--memory-budget", "lots"), "--memory-budget"),
    # fit: the output
    Case("fit-existing-run", lambda c: ["fit", c.ws.model, c.ws.train, "--out", c.run], "already holds a fit"),
    Case(
        "fit-overwrite-with-bad-data",
        lambda c: ["fit", c.ws.model, c.tmp / "body.jsonl", "--out", c.run, "--overwrite"],
        "no field 'text'",
        prepare=_write("body.jsonl", '{"body": "x"}\n'),
    ),
    Case(
        "fit-out-is-a-file",
        lambda c: ["fit", c.ws.model, c.ws.train, "--out", c.tmp / "file.txt"],
        "is a file",
        prepare=_write("file.txt", "x"),
    ),
    Case(
        "fit-out-under-a-file",
        lambda c: ["fit", c.ws.model, c.ws.train, "--out", c.tmp / "file.txt" / "run"],
        "cannot write",
        prepare=_write("file.txt", "x"),
    ),
    Case(
        "fit-out-not-a-run",
        lambda c: ["fit", c.ws.model, c.ws.train, "--out", c.tmp, "--overwrite"],
        "not an influencer run directory",
        prepare=_write("notes.txt", "keep me"),
    ),
    # scan: the run directory
    Case("scan-no-such-run", lambda c: ["scan", c.tmp / "x", "--queries", c.ws.queries], "no such run directory"),
    Case("scan-not-a-run", lambda c: ["scan", c.tmp, "--queries", c.ws.queries], "not a complete run directory"),
    Case("scan-existing-scan", _scan(), "already holds a scan", prepare=_scanned),
    Case("scan-model-mismatch", lambda c: [*_scan()(c), "--model", c.ws.other], "does not match the model"),
    Case(
        "scan-flipped-factor-byte",
        _scan(),
        "does not match the checksum",
        prepare=_flip("curvature/factors.safetensors"),
    ),
    Case(
        "scan-flipped-factor-header", _scan(), "factors.safetensors", prepare=_flip("curvature/factors.safetensors", 20)
    ),
    Case(
        "scan-truncated-factors",
        _scan(),
        "factors.safetensors",
        prepare=lambda c: _truncate(c.run / "curvature" / "factors.safetensors"),
    ),
    Case("scan-edited-damping", _scan(), "edited", prepare=_edit_manifest(_negative_damping)),
    Case("scan-broken-manifest", _scan(), "manifest.json", prepare=_edit_manifest(lambda m: m.pop("layers"))),
    Case("scan-manifest-not-json", _scan(), "not valid JSON", prepare=_flip("curvature/manifest.json", 0)),
    Case("scan-run-record-not-json", _scan(), "run.json' is not valid JSON", prepare=_write_run("{")),
    # scan: queries
    Case("scan-missing-queries-file", lambda c: ["scan", c.run, "--queries", c.tmp / "missing.jsonl"], "no such file"),
    Case(
        "scan-query-without-completion",
        lambda c: ["scan", c.run, "--queries", c.tmp / "q.jsonl"],
        "q.jsonl:2: no field 'completion'",
        prepare=_write("q.jsonl", json.dumps(QUERIES[0]) + '\n{"prompt": "x", "answer": "y"}\n'),
    ),
    Case(
        "scan-query-empty-completion",
        lambda c: ["scan", c.run, "--queries", c.tmp / "q.jsonl"],
        "q.jsonl:1: empty completion",
        prepare=_write("q.jsonl", '{"prompt": "In the", "completion": ""}\n'),
    ),
    Case("scan-blank-completion", lambda c: ["scan", c.run, "-p", "In the", "-c", " "], "empty"),
    Case("scan-unpaired-prompts", lambda c: ["scan", c.run, "-p", "a", "-p", "b", "-c", " c"], "pair each prompt"),
    Case("scan-no-queries", lambda c: ["scan", c.run], "no queries"),
    Case("scan-queries-twice", lambda c: [*_scan()(c), "-p", "a", "-c", " b"], "not both"),
    Case("scan-query-too-long", _scan("--query-max-length", "4"), "more than max length 4"),
    Case(
        "scan-prompt-beyond-positions",
        lambda c: ["scan", c.run, "-p", " ".join(v["text"] for v in kjv_verses(12)), "-c", " Amen."],
        "reads at most 256 positions",
    ),
    # scan: options
    Case("scan-refine-unreadable", _scan("--refine", "lots"), "--refine takes"),
    Case("scan-refine-negative", _scan("--refine", "-2"), "--refine takes"),
    Case("scan-self-correct-unreadable", _scan("--self-correct", "maybe"), "--self-correct takes"),
    Case("scan-data-option-without-data", _scan("--max-length", "9"), "--data"),
    Case("scan-memory-budget-too-small", _scan("--memory-budget", "1MB"), "would peak at"),
    Case("scan-memory-budget-unreadable", _scan("--memory-budget", "0GB"), "--memory-budget"),
    Case("scan-rank-negative", _scan("--rank", "-1"), "--rank", code=2),
    # the other commands
    Case("probe-blank-completion", lambda c: ["probe", c.run, "-p", "x", "-c", "  "], "--completion is empty"),
    Case("report-without-a-scan", lambda c: ["report", c.run], "has no finished scan"),
    Case("plan-layers-empty", lambda c: ["plan", c.ws.model, "--layers", ""], "is empty"),
    Case("plan-memory-budget-unreadable", lambda c: ["plan", c.ws.model, "--memory-budget", "x"], "--memory-budget"),
]


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_the_table_is_large_and_unique() -> None:
    assert len(CASES) >= 40
    assert len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_refused_with_one_error_line_and_nothing_changed(ws, tmp_path, case: Case) -> None:  # noqa: F811
    run = tmp_path / "run"
    shutil.copytree(ws.run, run)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    ctx = SimpleNamespace(ws=ws, run=run, tmp=scratch, new=tmp_path / "new-run")
    case.prepare(ctx)
    before_run, before_scratch = snapshot(run), snapshot(scratch)
    line = error_line(invoke(*case.args(ctx)), code=case.code)
    assert case.expect in line, line
    assert snapshot(run) == before_run
    assert snapshot(scratch) == before_scratch
    assert not ctx.new.exists()
    assert not [p.name for p in tmp_path.rglob("*") if ".tmp" in p.name]


def test_cuda_on_a_machine_without_one(ws, tmp_path) -> None:  # noqa: F811
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    line = error_line(invoke("fit", ws.model, ws.train, "--out", tmp_path / "r", "--device", "cuda"))
    assert "no CUDA device" in line and not (tmp_path / "r").exists()
