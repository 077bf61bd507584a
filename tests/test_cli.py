"""The command line end to end on a tiny local Hugging Face model: fit → scan → report, and every error path.

The model is a random tiny Llama saved with ``save_pretrained`` next to a byte-level BPE tokenizer trained offline
(tests/tiny_hf.py), i.e. exactly what a user's local model folder looks like.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shlex
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
typer_testing = pytest.importorskip("typer.testing")

from tiny_hf import byte_bpe_tokenizer, tiny_model_folder  # noqa: E402

import influencer as inf  # noqa: E402
from influencer.cli import app  # noqa: E402
from influencer.data import kjv_verses  # noqa: E402

SRC = Path(__file__).resolve().parents[1] / "src"
QUERIES = [
    {"prompt": "In the beginning God created", "completion": " the heaven and the earth."},
    {"prompt": "And God said,", "completion": " Let there be light."},
]


# --------------------------------------------------------------------------------------------------- helpers


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def invoke(*args: object, env: dict[str, str] | None = None):
    runner = typer_testing.CliRunner(env={"COLUMNS": "200", **(env or {})})
    return runner.invoke(app, [str(a) for a in args])


def ok(result) -> str:
    assert result.exit_code == 0, f"exit {result.exit_code}\n{result.output}\n{result.exception!r}"
    return result.output


def error_line(result, code: int = 1) -> str:
    """The command failed with exactly one line on stderr, ``error: ...``, and no traceback."""
    assert result.exit_code == code, f"exit {result.exit_code}\n{result.output}"
    stderr = getattr(result, "stderr", result.output)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit)
    return lines[0]


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (hidden ones too) → sha256 of its bytes."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> types.SimpleNamespace:
    """A tiny model folder (and a different one), training data, queries, and one fitted run (via a subprocess)."""
    root = tmp_path_factory.mktemp("cli")
    tok = byte_bpe_tokenizer([v["text"] for v in kjv_verses(200)])
    model = tiny_model_folder(root / "tiny", tokenizer=tok)
    other = tiny_model_folder(root / "other", tokenizer=tok, seed=1)
    verses = kjv_verses(24)
    train = _jsonl(root / "train.jsonl", [{"text": v["text"], "citation": v["citation"]} for v in verses])
    queries = _jsonl(root / "q.jsonl", QUERIES)
    run = root / "run"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        "COLUMNS": "200",
    }
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "influencer",
            "fit",
            str(model),
            str(train),
            "--out",
            str(run),
            "--batch-size",
            "8",
            "--seed",
            "3",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return types.SimpleNamespace(
        root=root,
        tok=tok,
        model=model,
        other=other,
        train=train,
        queries=queries,
        run=run,
        fit_stdout=proc.stdout,
        fit_stderr=proc.stderr,
        env=env,
    )


# ------------------------------------------------------------------------------------------------------ help


def test_help_lists_every_command_and_option():
    out = ok(invoke("--help"))
    for command in ("fit", "scan", "probe", "report", "demo", "validate"):
        assert command in out
    fit_help = ok(invoke("fit", "--help"))
    for option in (
        "--out",
        "--layers",
        "--strategy",
        "--fisher",
        "--damping",
        "--blocks",
        "--sequences",
        "--batch-size",
        "--max-length",
        "--packing",
        "--truncation",
        "--device",
        "--dtype",
        "--overwrite",
        "--format",
        "--field",
        "--text-unit",
        "--split",
    ):
        assert option in fit_help, option
    scan_help = ok(invoke("scan", "--help"))
    for option in (
        "--queries",
        "--prompt",
        "--completion",
        "--rank",
        "--top-k",
        "--prefilter",
        "--per-layer",
        "--tokens",
        "--chat-template",
        "--query-truncation",
        "--data",
        "--overwrite",
        "--refine",
        "--refine-sequences",
        "--split-completion",
    ):
        assert option in scan_help, option
    for command in ("probe", "report", "demo", "validate"):
        ok(invoke(command, "--help"))
    assert re.search(r"influencer \d", ok(invoke("--version")))


def test_readme_command_line_section_is_accurate():
    """Every option the README's command-line section shows exists in that command's --help."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Command line", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"^influencer (\w+)(.*)$", "\n".join(re.findall(r"```bash\n(.*?)```", section, re.S)), re.M)
    assert {c for c, _ in commands} >= {"fit", "scan", "report"}
    for command, rest in commands:
        helptext = ok(invoke(command, "--help"))
        for option in re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", rest):
            assert option in helptext, f"README shows influencer {command} {option}, which --help does not list"


# --------------------------------------------------------------------------------------------- end to end


def test_fit_writes_a_run_directory(ws):
    run = ws.run
    assert (run / "run.json").is_file()
    assert (run / "curvature" / "manifest.json").is_file() and (run / "curvature" / "factors.safetensors").is_file()
    record = json.loads((run / "run.json").read_text())
    assert record["format"] == "influencer.run"
    assert record["model"]["source"] == str(ws.model.resolve()) and record["model"]["class"] == "LlamaForCausalLM"
    assert record["data"]["source"] == str(ws.train.resolve()) and record["data"]["format"] == "jsonl"
    assert record["data"]["report"]["sequences"] == 24 and record["data"]["report"]["truncated"] == 0
    assert record["fit"]["strategy"] == "ekfac" and record["fit"]["seed"] == 3
    assert record["fit"]["tracked_layers"] == [
        f"model.layers.{i}.mlp.{p}_proj" for i in range(2) for p in ("gate", "up", "down")
    ]
    assert {"torch", "transformers", "influencer", "python"} <= set(record["versions"])
    assert {
        "load model",
        "read data",
        "tokenize",
        "fit",
        "fit/covariance",
        "fit/eigendecomposition",
        "fit/eigenvalue correction",
    } <= set(record["timings"])
    assert "fit timings" in ws.fit_stdout and "eigenvalue correction" in ws.fit_stdout
    assert "24 documents → 24 sequences" in ws.fit_stdout
    assert "Traceback" not in ws.fit_stderr and "Loading weights" not in ws.fit_stderr
    assert not [p.name for p in run.parent.iterdir() if ".tmp-" in p.name]  # no temporary folder left


def test_scan_matches_the_library_and_prints_hits(ws, tmp_path):
    run = tmp_path / "run"
    _copy(ws.run, run)
    out = ok(
        invoke("scan", run, "--queries", ws.queries, "--rank", "0", "--top-k", "5", "--per-layer", "--keep-scores")
    )
    for piece in (
        "Query 1",
        "In the beginning God created",
        "Query 2",
        "train.jsonl:",
        "scan timings",
        "query gradients",
        "token attribution",
        "per copy = influence / N with N = 24",
        "up_proj",
        # two queries over 24 sequences: the cost model cannot afford one step over 16 of them, and says so
        "refinement: none (budget too small",
        "is a score, not nats",
        "per copy (score)",
    ):
        assert piece in out, piece
    assert (run / "scan" / "result.json").is_file() and not (run / "scan.partial").exists()
    request = json.loads((run / "scan" / "request.json").read_text())
    assert [q["prompt"] for q in request["queries"]] == [q["prompt"] for q in QUERIES]
    assert request["settings"]["rank"] is None and request["data"]["digest"]
    assert request["settings"]["refine"] == "auto" and request["settings"]["refine_plan"]["steps"] == 0
    assert request["settings"]["inverse"] == {"inverse": "curvature", "strategy": "ekfac", "steps": 0}

    # the same numbers as the library, computed directly
    result = inf.ScanResult.load(run / "scan")
    model, tok = inf_models_load(ws.model)
    curv = inf.Curvature.load(run / "curvature", model)
    train = _train_batch(tok)
    queries = inf_queries(tok)
    task = inf.CausalLM(pad_token_id=tok.pad_token_id)
    exact = inf.pairwise_scores(model, task, curv, queries, train, batch_size=8, progress=False).total
    torch.testing.assert_close(result.scores, exact, rtol=1e-4, atol=1e-4)
    for q in range(2):
        top = [h.index for h in result.top(q, 5)]
        assert top == exact[q].argsort(descending=True)[:5].tolist()
        hit = result.top(q, 1)[0]
        assert hit.tokens is not None and abs(float(hit.tokens.sum()) - hit.score) < 1e-3 * max(1, abs(hit.score))


def test_scan_with_flags_prefilter_and_chat_template(ws, tmp_path):
    run = tmp_path / "run"
    _copy(ws.run, run)
    out = ok(
        invoke(
            "scan",
            run,
            "-p",
            "And God said,",
            "-c",
            " Let there be light.",
            "--prefilter",
            "6",
            "--chat-template",
            "--system",
            "Be brief.",
            "--no-tokens",
            "--show",
            "3",
        )
    )
    assert "chat template applied" in out and "scanned 6 sequences" in out
    request = json.loads((run / "scan" / "request.json").read_text())
    assert request["settings"]["prefilter"] == 6 and request["chat_template"] is True
    assert request["queries"][0]["source"] == "--prompt 1"
    # a second scan needs --overwrite, then replaces the first one
    line = error_line(invoke("scan", run, "--queries", ws.queries))
    assert "already holds a scan" in line and "--overwrite" in line
    ok(invoke("scan", run, "--queries", ws.queries, "--overwrite", "--no-tokens"))
    assert len(json.loads((run / "scan" / "request.json").read_text())["queries"]) == 2
    # --precision bfloat16: recorded in the request and the result; the same top hits as float32 here
    float32 = inf.ScanResult.load(run / "scan")
    ok(invoke("scan", run, "--queries", ws.queries, "--overwrite", "--no-tokens", "--precision", "bfloat16"))
    bf16 = inf.ScanResult.load(run / "scan")
    assert json.loads((run / "scan" / "request.json").read_text())["settings"]["precision"] == "bfloat16"
    assert bf16.meta["precision"] == "bfloat16"
    assert [h.index for h in bf16.top(0, 3)] == [h.index for h in float32.top(0, 3)]


def test_scan_of_other_data_with_packing(ws, tmp_path):
    run = tmp_path / "run"
    _copy(ws.run, run)
    text = ws.root / "more.txt"
    text.write_text("\n".join(v["text"] for v in kjv_verses(10, start=30)) + "\n", encoding="utf-8")
    out = ok(
        invoke("scan", run, "--queries", ws.queries, "--data", text, "--packing", "--max-length", "32", "--no-tokens")
    )
    assert "packed into 32-token sequences" in out and "more.txt:" in out
    data = json.loads((run / "scan" / "request.json").read_text())["data"]
    assert data["format"] == "text" and data["packing"] is True and data["report"]["packing"] is True


def test_scan_refine_matches_the_library(ws, tmp_path):
    from influencer.refine import RefinedInverse
    from influencer.refine_plan import sample_rows

    run = tmp_path / "run"
    _copy(ws.run, run)
    line = error_line(invoke("scan", run, "--queries", ws.queries, "--refine", "0", "--refine-sequences", "8"), code=1)
    assert "--refine-sequences sets the refinement sample" in line
    line = error_line(invoke("scan", run, "--queries", ws.queries, "--refine", "lots"), code=1)
    assert "--refine takes 'auto' or a number of CG steps" in line
    args = ("--rank", "0", "--keep-scores", "--no-tokens")
    line = error_line(invoke("scan", run, "--queries", ws.queries, "--self-correct", "maybe"), code=1)
    assert "--self-correct takes auto, on or off" in line
    out = ok(invoke("scan", run, "--queries", ws.queries, *args, "--refine", "3", "--refine-sequences", "16"))
    assert "refinement: 3 CG steps over 16 of the fit's sequences" in out
    # 24 sequences cannot pay for correcting the hits of 2 queries: the default says so and prints scores
    assert "hits not corrected for their own curvature" in out and "per copy (score)" in out
    out = ok(
        invoke(
            "scan",
            run,
            "--queries",
            ws.queries,
            *args,
            "--refine",
            "3",
            "--refine-sequences",
            "16",
            "--self-correct",
            "on",
            "--overwrite",
        )
    )
    assert "per copy (nats)" in out and "in nats from adding one copy (refined: 3 CG steps over 16" in out
    assert "hits rescaled by their own curvature" in out
    request = json.loads((run / "scan" / "request.json").read_text())
    assert request["settings"]["refine"] == 3 and request["settings"]["refine_sequences"] == 16
    inverse = request["settings"]["inverse"]
    assert inverse["inverse"] == "refined" and inverse["steps"] == 3 and inverse["data_size"] == 16
    result = inf.ScanResult.load(run / "scan")
    assert result.meta["inverse"] == inverse
    model, tok = inf_models_load(ws.model)
    curv = inf.Curvature.load(run / "curvature", model)
    train = _train_batch(tok)
    task = inf.CausalLM(pad_token_id=tok.pad_token_id)
    rows = sample_rows(24, 16, 0)  # the seeded sample of the fit's 24 sequences
    by_hand = RefinedInverse(model, task, curv, {k: v[rows] for k, v in train.items()}, steps=3)
    expected = inf.pairwise_scores(model, task, by_hand, inf_queries(tok), train, batch_size=8, progress=False).total
    plain = inf.pairwise_scores(model, task, curv, inf_queries(tok), train, batch_size=8, progress=False).total
    torch.testing.assert_close(result.scores, expected, rtol=1e-4, atol=1e-4)
    assert (plain - expected).norm() > 1e-2 * expected.norm()  # the refinement changed the answer
    # scanning other data still refines on the fit's own sequences (the same seeded sample)
    text = ws.root / "refine-other.txt"
    text.write_text("\n".join(v["text"] for v in kjv_verses(6, start=40)) + "\n", encoding="utf-8")
    ok(
        invoke(
            "scan",
            run,
            "--queries",
            ws.queries,
            "--data",
            text,
            *args,
            "--refine",
            "3",
            "--refine-sequences",
            "16",
            "--overwrite",
        )
    )
    other = inf.ScanResult.load(run / "scan")
    assert other.meta["inverse"]["sample_digest"] == result.meta["inverse"]["sample_digest"]


def test_scan_default_path_refines_one_query_and_splits_its_completion(ws, tmp_path):
    from influencer.completion import completion_split
    from influencer.refine_plan import default_inverse
    from influencer.units import cg_steps

    run = tmp_path / "run"
    _copy(ws.run, run)
    prompt, completion = "In the beginning God created", " the heaven and the earth."
    out = ok(
        invoke(
            "scan",
            run,
            "-p",
            prompt,
            "-c",
            completion,
            "--rank",
            "0",
            "--keep-scores",
            "--split-completion",
            "--show",
            "3",
        )
    )
    request = json.loads((run / "scan" / "request.json").read_text())
    plan, inverse = request["settings"]["refine_plan"], request["settings"]["inverse"]
    assert request["settings"]["refine"] == "auto" and plan["steps"] >= 1 and inverse["inverse"] == "refined"
    assert f"refinement: {cg_steps(plan['steps'])} over {plan['sample']} of the fit's sequences" in out
    assert "which completion token drives the score" in out and "'.'" in out
    # the library's default path gives the same scores and the same split
    model, tok = inf_models_load(ws.model)
    curv = inf.Curvature.load(run / "curvature", model)
    train = _train_batch(tok)
    task = inf.CausalLM(pad_token_id=tok.pad_token_id)
    from influencer.data import encode_queries

    query = encode_queries(tok, [{"prompt": prompt, "completion": completion}])[0]
    lib, lib_plan = default_inverse(model, task, curv, train, refine="auto", n_queries=1, n_scan=24, rank=None)
    assert lib.describe() == inverse and lib_plan.to_dict() == plan
    result = inf.ScanResult.load(run / "scan")
    expected = inf.pairwise_scores(model, task, lib, query, train, batch_size=8, progress=False).total
    torch.testing.assert_close(result.scores, expected, rtol=1e-4, atol=1e-4)
    hits = [h.index for h in result.top(0, 3)]
    (split,) = completion_split(model, task, lib, query, train, {0: hits})
    saved = result.meta["completion_split"]["0"]
    assert saved["tokens"] == split.tokens and saved["hits"].keys() == {str(i) for i in hits}
    for i in hits:
        torch.testing.assert_close(torch.tensor(saved["hits"][str(i)]).double(), split.hits[i], rtol=1e-4, atol=1e-6)
        assert abs(float(split.hits[i].sum()) - float(expected[0, i])) <= 1e-3 * float(expected[0].abs().max())
    ok(invoke("report", run))
    html = (run / "report.html").read_text(encoding="utf-8")
    assert "Which completion token drives the score" in html and "nats" in html


def test_probe_prints_each_order_and_matches_the_library(ws, tmp_path):
    from influencer.probe import CONDITIONS, word_order_probe

    out_json = tmp_path / "probe.json"
    out = ok(
        invoke(
            "probe",
            ws.run,
            "-p",
            "In the beginning God created",
            "-c",
            " the heaven",
            "--refine",
            "0",
            "--out",
            out_json,
        )
    )
    for cond in CONDITIONS:
        assert cond in out
    assert "ratio prompt→completion / completion→prompt" in out and "is a score, not nats" in out
    saved = json.loads(out_json.read_text())
    model, tok = inf_models_load(ws.model)
    curv = inf.Curvature.load(ws.run / "curvature", model)
    task = inf.CausalLM(pad_token_id=tok.pad_token_id)
    lib = word_order_probe(model, task, curv, tok, "In the beginning God created", " the heaven")
    for cond in CONDITIONS:
        torch.testing.assert_close(
            torch.tensor(saved["influence"][cond]), torch.tensor(lib.influence[cond]), rtol=1e-4, atol=1e-6
        )
    assert saved["ratio"] == pytest.approx(lib.ratio, rel=1e-3)
    line = error_line(invoke("probe", ws.run, "-p", "x", "-c", "  "), code=1)
    assert "--completion is empty" in line


def test_fit_options_packing_and_strategy(ws, tmp_path):
    run = tmp_path / "packed"
    out = ok(
        invoke(
            "fit",
            ws.model,
            ws.train,
            "--out",
            run,
            "--packing",
            "--max-length",
            "24",
            "--strategy",
            "kfac",
            "--layers",
            r"layers\.1\.mlp\.(up|down)_proj",
            "--sequences",
            "5",
            "--damping",
            "0.01",
            "--n-train",
            "1000",
            "--device",
            "cpu",
            "--dtype",
            "float64",
        )
    )
    assert "5 sequences (packed into 24-token sequences)" in out
    record = json.loads((run / "run.json").read_text())
    assert record["fit"]["tracked_layers"] == ["model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"]
    curv = inf.Curvature.load(run / "curvature")
    assert (curv.strategy, curv.n_fit, curv.n_train) == ("kfac", 5, 1000)
    assert all(f.damping == 0.01 for f in curv.layers.values())


def test_fit_precision_bfloat16_is_recorded(ws, tmp_path):
    run = tmp_path / "bf16"
    ok(invoke("fit", ws.model, ws.train, "--out", run, "--sequences", "4", "--precision", "bfloat16"))
    assert json.loads((run / "run.json").read_text())["fit"]["precision"] == "bfloat16"
    curv = inf.Curvature.load(run / "curvature")
    assert curv.precision == "bfloat16" and curv.complete


def test_truncation_is_reported(ws, tmp_path):
    out = ok(invoke("fit", ws.model, ws.train, "--out", tmp_path / "run", "--max-length", "16"))
    assert re.search(r"\d+ sequences longer than 16 tokens lost their end", out)
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["data"]["report"]["truncated"] > 0


# ------------------------------------------------------------------------------------------------- report


def test_report_with_the_real_module(ws, tmp_path):
    pytest.importorskip(
        "influencer.report", reason="influencer.report (the report helper's module) is not on this branch yet"
    )
    run = tmp_path / "run"
    _copy(ws.run, run)
    ok(invoke("scan", run, "--queries", ws.queries))
    out = ok(invoke("report", run))
    html = (run / "report.html").read_text(encoding="utf-8")
    assert "wrote" in out and "In the beginning God created" in html
    # two queries over 24 sequences are not refined: the report calls per-copy values a score, not nats
    assert "is a score, not nats" in html and "(score)" in html


def test_report_calls_write_report_with_the_documented_arguments(ws, tmp_path, monkeypatch):
    calls = []

    def write_report(
        result,
        path,
        *,
        queries,
        train_tokens,
        train_text=None,
        train_source=None,
        title="influencer report",
        top=10,
        notes=(),
    ):
        calls.append(
            {
                "result": result,
                "queries": queries,
                "tokens": train_tokens(0),
                "text": train_text(0),
                "source": train_source(0),
                "title": title,
                "top": top,
                "notes": list(notes),
            }
        )
        Path(path).write_text("<html>report</html>", encoding="utf-8")
        return Path(path)

    fake = types.ModuleType("influencer.report")
    fake.write_report = write_report  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "influencer.report", fake)
    run = tmp_path / "run"
    _copy(ws.run, run)
    ok(invoke("scan", run, "--queries", ws.queries, "--no-tokens"))
    ok(invoke("report", run, "--out", tmp_path / "out" / "r.html", "--top", "4", "--title", "T"))
    assert (tmp_path / "out" / "r.html").read_text() == "<html>report</html>"
    assert not [p for p in (tmp_path / "out").iterdir() if p.name != "r.html"]  # the temporary file is gone
    (call,) = calls
    assert isinstance(call["result"], inf.ScanResult) and call["title"] == "T" and call["top"] == 4
    assert [(q["prompt"], q["completion"]) for q in call["queries"]] == [
        (q["prompt"], q["completion"]) for q in QUERIES
    ]
    first = kjv_verses(1)[0]["text"]
    assert "".join(call["tokens"]) == first and call["text"].endswith(first)
    assert call["source"] == "train.jsonl:1"  # the hit's source goes to the page's hit header
    assert any("ekfac" in n for n in call["notes"])


def test_demo_writes_a_report_when_the_module_exists(ws, tmp_path, monkeypatch):
    from influencer import demo

    model, tok = inf_models_load(ws.model)
    task = inf.CausalLM(pad_token_id=tok.pad_token_id)
    train = _train_batch(tok)
    curv = inf.fit_curvature(model, task, train, batch_size=8, progress=False)
    result = inf.scan(model, task, curv, inf_queries(tok), train, batch_size=8, progress=False)
    verses = kjv_verses(24)
    monkeypatch.setitem(sys.modules, "influencer.report", None)
    assert demo._write_report(result, tok, train, verses, tmp_path / "r.html", top=3, n_fit=len(verses)) is None
    seen = {}

    def write_report(result, path, **kwargs):
        seen.update(
            kwargs, text=kwargs["train_text"](0), tokens=kwargs["train_tokens"](0), source=kwargs["train_source"](0)
        )
        Path(path).write_text("ok")
        return Path(path)

    fake = types.ModuleType("influencer.report")
    fake.write_report = write_report  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "influencer.report", fake)
    assert (
        demo._write_report(result, tok, train, verses, tmp_path / "d" / "r.html", top=3, n_fit=len(verses))
        == tmp_path / "d" / "r.html"
    )
    assert seen["text"] == verses[0]["text"] and "".join(seen["tokens"]) == verses[0]["text"]
    assert seen["source"] == "Genesis 1:1"  # the verse is named in the hit's header
    assert [q["completion"] for q in seen["queries"]] == [c for _, c, _ in demo.QUERIES] and seen["top"] == 3


def test_report_without_the_module_or_scan(ws, tmp_path, monkeypatch):
    run = tmp_path / "run"
    _copy(ws.run, run)
    monkeypatch.setitem(sys.modules, "influencer.report", None)  # import fails as if the module were absent
    assert "no report module" in error_line(invoke("report", run))
    monkeypatch.delitem(sys.modules, "influencer.report")
    fake = types.ModuleType("influencer.report")
    fake.write_report = lambda *a, **k: None  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "influencer.report", fake)
    assert "has no finished scan" in error_line(invoke("report", run))


def test_interrupted_scan_resumes(ws, tmp_path, monkeypatch):
    import influencer.runs.paths

    run = tmp_path / "run"
    _copy(ws.run, run)

    def interrupted(run_dir):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(influencer.runs.paths, "publish_scan", interrupted)
        result = invoke("scan", run, "--queries", ws.queries, "--shard-size", "10", "--no-tokens")
    assert result.exit_code == 130 and "error: interrupted" in result.output
    assert (run / "scan.partial" / "scan.json").is_file() and not (run / "scan").exists()
    line = error_line(invoke("scan", run, "-p", "Other", "-c", " query", "--shard-size", "10", "--no-tokens"))
    assert "unfinished scan made with" in line and "--overwrite" in line
    out = ok(invoke("scan", run, "--queries", ws.queries, "--shard-size", "10", "--no-tokens"))
    assert "resuming the unfinished scan" in out
    assert (run / "scan" / "result.json").is_file() and not (run / "scan.partial").exists()


# --------------------------------------------------------------------------------------------- error paths


def test_errors_missing_files(ws, tmp_path):
    line = error_line(invoke("fit", ws.model, tmp_path / "nope.jsonl", "--out", tmp_path / "run"))
    assert "nope.jsonl: no such file or folder" in line
    line = error_line(invoke("fit", tmp_path / "no-model", ws.train, "--out", tmp_path / "run"))
    assert "no-model" in line and "does not exist" in line
    assert not (tmp_path / "run").exists()
    before = snapshot(ws.run)
    assert "missing.jsonl: no such file" in error_line(invoke("scan", ws.run, "--queries", tmp_path / "missing.jsonl"))
    assert "not a complete run directory" in error_line(invoke("scan", tmp_path, "--queries", ws.queries))
    assert "no such run directory" in error_line(invoke("scan", tmp_path / "x", "--queries", ws.queries))
    assert snapshot(ws.run) == before


def test_errors_bad_jsonl_lines(ws, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "In the beginning"}\n{"text": "And God said\n', encoding="utf-8")
    line = error_line(invoke("fit", ws.model, bad, "--out", tmp_path / "run"))
    assert f"{bad}:2: not valid JSON" in line
    queries = _jsonl(tmp_path / "q.jsonl", [QUERIES[0], {"prompt": "x", "answer": "y"}])
    before = snapshot(ws.run)
    line = error_line(invoke("scan", ws.run, "--queries", queries))
    assert f"{queries}:2: no field 'completion'" in line
    assert snapshot(ws.run) == before


def test_errors_unknown_layer_preset(ws, tmp_path):
    line = error_line(invoke("fit", ws.model, ws.train, "--out", tmp_path / "run", "--layers", "mlpp"))
    assert "unknown layer preset 'mlpp'" in line and "mlp, attention, all" in line
    line = error_line(invoke("fit", ws.model, ws.train, "--out", tmp_path / "run", "--layers", r"nothing\.here"))
    assert "matched no layer" in line and "model.layers.0" in line
    assert not (tmp_path / "run").exists()


def test_errors_model_curvature_mismatch(ws):
    before = snapshot(ws.run)
    line = error_line(invoke("scan", ws.run, "--queries", ws.queries, "--model", ws.other))
    assert "the curvature does not match the model" in line and "weights differ" in line
    assert snapshot(ws.run) == before


def test_errors_empty_completion(ws, tmp_path):
    before = snapshot(ws.run)
    assert "empty" in error_line(invoke("scan", ws.run, "-p", "In the", "-c", " "))
    queries = _jsonl(tmp_path / "q.jsonl", [{"prompt": "In the", "completion": ""}])
    assert f"{queries}:1: empty completion" in error_line(invoke("scan", ws.run, "--queries", queries))
    assert "pair each prompt" in error_line(invoke("scan", ws.run, "-p", "a", "-p", "b", "-c", " c"))
    assert "no queries" in error_line(invoke("scan", ws.run))
    assert snapshot(ws.run) == before


def test_errors_over_length_with_truncation_error(ws, tmp_path):
    line = error_line(
        invoke("fit", ws.model, ws.train, "--out", tmp_path / "run", "--max-length", "8", "--truncation", "error")
    )
    assert re.search(r"document train\.jsonl:1 has \d+ tokens, more than max length 8", line)
    before = snapshot(ws.run)
    line = error_line(invoke("scan", ws.run, "--queries", ws.queries, "--query-max-length", "4"))
    assert "more than max length 4" in line
    long_prompt = " ".join(v["text"] for v in kjv_verses(12))  # longer than the model's 256 positions
    line = error_line(invoke("scan", ws.run, "-p", long_prompt, "-c", " Amen."))
    assert "the model reads at most 256 positions" in line and "--query-max-length" in line
    assert snapshot(ws.run) == before


def test_errors_existing_fit_is_kept(ws, tmp_path):
    run = tmp_path / "run"
    _copy(ws.run, run)
    before = snapshot(run)
    line = error_line(invoke("fit", ws.model, ws.train, "--out", run))
    assert "already holds a fit" in line and "--overwrite" in line
    # --overwrite with bad input fails before anything is written
    bad = _jsonl(tmp_path / "bad.jsonl", [{"body": "x"}])
    assert "no field 'text'" in error_line(invoke("fit", ws.model, bad, "--out", run, "--overwrite"))
    assert snapshot(run) == before
    not_a_run = tmp_path / "mine"
    not_a_run.mkdir()
    (not_a_run / "notes.txt").write_text("keep me")
    assert "not an influencer run directory" in error_line(
        invoke("fit", ws.model, ws.train, "--out", not_a_run, "--overwrite")
    )
    assert (not_a_run / "notes.txt").read_text() == "keep me"
    # and --overwrite with good input replaces the fit atomically
    ok(invoke("fit", ws.model, ws.train, "--out", run, "--overwrite", "--sequences", "4"))
    assert json.loads((run / "run.json").read_text())["fit"]["n_fit"] == 4
    assert not [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_errors_changed_training_data_and_usage(ws, tmp_path):
    run = tmp_path / "run"
    _copy(ws.run, run)
    data = tmp_path / "train.jsonl"
    _jsonl(data, [{"text": v["text"]} for v in kjv_verses(24)])
    record = json.loads((run / "run.json").read_text())
    record["data"]["source"] = str(data)
    (run / "run.json").write_text(json.dumps(record))
    ok(invoke("scan", run, "-p", "In the", "-c", " beginning", "--no-tokens"))  # same tokens: fine
    _jsonl(data, [{"text": v["text"]} for v in kjv_verses(24, start=1)])
    line = error_line(invoke("scan", run, "-p", "In the", "-c", " beginning", "--overwrite"))
    assert "changed since the fit" in line
    assert "--data" in error_line(invoke("scan", run, "-p", "a", "-c", " b", "--max-length", "9"))
    line = error_line(invoke("fit", ws.model, ws.train, "--out", tmp_path / "r", "--strategy", "nope"), code=2)
    assert "'nope' is not one of" in line and "influencer fit --help" in line
    assert "Missing option '--out'" in error_line(invoke("fit", ws.model, ws.train), code=2)
    assert (
        "no CUDA device" in error_line(invoke("fit", ws.model, ws.train, "--out", tmp_path / "r", "--device", "cuda"))
        or torch.cuda.is_available()
    )


def test_debug_shows_the_exception(ws, tmp_path):
    result = invoke("--debug", "fit", ws.model, tmp_path / "nope.jsonl", "--out", tmp_path / "run")
    assert result.exit_code == 1 and isinstance(result.exception, ValueError)
    assert "no such file" in str(result.exception)


def test_errors_in_a_real_process(ws, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "influencer", "scan", str(ws.run), "-p", "In the", "-c", ""],
        capture_output=True,
        text=True,
        env=ws.env,
        timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and proc.stderr.startswith("error: ")
    assert "empty" in proc.stderr and "Traceback" not in proc.stderr + proc.stdout


class _FakeValidation:
    """Stands in for a validation result: what the command prints and writes, without the hours of work."""

    def __init__(self) -> None:
        self.setup_info = {"setup": "fake"}

    def to_markdown(self) -> str:
        return "| method | pearson |"

    def save(self, path) -> Path:
        Path(path).mkdir(parents=True)
        return Path(path)

    def plot(self, path) -> Path:
        raise ImportError("matplotlib is not installed")


def test_validate_passes_every_option_and_records_the_command(monkeypatch, tmp_path):
    import influencer.validate as validation

    seen: dict[str, object] = {}

    def load_setup(name, **kwargs):
        seen.update(setup_name=name, setup_kwargs=kwargs)
        kwargs["log"]("training the setup")
        return "the setup"

    def run_experiment(setup, **kwargs):
        seen.update(kwargs, setup=setup)
        return _FakeValidation()

    monkeypatch.setattr(validation, "load_setup", load_setup)
    monkeypatch.setattr(validation, "run_experiment", run_experiment)
    out = tmp_path / "v"
    args = ["--setup", "digits", "--size", "small", "--set", "steps=300", "--set", "lr=3e-3", "--train-points", "50"]
    args += ["--methods", "ekfac, pcg", "--lissa-depth", "7", "--pcg-iterations", "3", "--out", str(out)]
    printed = ok(invoke("validate", "experiment", *args))
    assert "| method | pearson |" in printed and "training the setup" in printed and "no figure" in printed
    assert seen["setup_name"] == "digits" and seen["setup"] == "the setup"
    assert seen["setup_kwargs"]["steps"] == 300 and seen["setup_kwargs"]["lr"] == 3e-3  # type: ignore[index]
    assert seen["setup_kwargs"]["size"] == "small" == seen["size"]  # type: ignore[index]
    assert seen["methods"] == ["ekfac", "ekfac-pcg"] and seen["train_points"] == 50 and seen["measurements"] is None
    assert seen["lissa"] == {"batch_size": 128, "repeats": 1, "depth": 7} and seen["pcg_iterations"] == 3
    assert seen["progress"] is True  # (long LiSSA / CG loops report through the log, see below)
    assert seen["checkpoint"] == out / "pbrf-checkpoint" and (out / "result").is_dir()
    table = (out / "table.md").read_text()
    assert f"validate experiment {shlex.join(args)}`" in table.splitlines()[0]  # (options in declaration order)
    assert table.rstrip().endswith("| method | pearson |")


def test_log_bars_are_rate_limited_and_estimate_time_left(monkeypatch):
    from influencer import progress

    clock = iter([0.0, 10.0, 70.0, 80.0, 140.0])
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    lines: list[str] = []
    bar = progress.LogBars(lines.append, every=60.0)("LiSSA", 100, "step")  # starts at t = 0
    for _ in range(4):  # t = 10, 70, 80, 140
        bar.update(10)
    assert lines == [
        "  LiSSA 20/100 steps (3.50 s/step, ~5 min left)",
        "  LiSSA 40/100 steps (3.50 s/step, ~4 min left)",
    ]


def test_validate_refuses_bad_requests_before_any_work(monkeypatch):
    import influencer.validate as validation

    def no_work(*args, **kwargs):
        raise AssertionError("reached the work")

    monkeypatch.setattr(validation, "load_setup", no_work)
    assert "unknown method 'bogus'" in error_line(invoke("validate", "experiment", "--methods", "ekfac,bogus"))
    assert "unknown strategy 'bogus'" in error_line(invoke("validate", "lds", "--strategies", "ekfac,bogus"))
    assert "'kjv' is not one of" in error_line(invoke("validate", "lds", "--setup", "kjv"), code=2)
    monkeypatch.setattr(validation, "load_setup", lambda name, **kwargs: "the setup")
    assert "--set expects KEY=VALUE" in error_line(invoke("validate", "lds", "--set", "steps"))


# ----------------------------------------------------------------------------------------- progress hooks


def test_library_progress_goes_through_installed_bars(ws):
    from influencer.progress import use_bars

    events: list[tuple[str, int | None, int]] = []

    class Bar:
        def __init__(self, desc, total, unit):
            self.desc, self.total, self.count = desc, total, 0

        def update(self, n=1):
            self.count += n

        def close(self):
            events.append((self.desc, self.total, self.count))

    model, tok = inf_models_load(ws.model)
    task = inf.CausalLM(pad_token_id=tok.pad_token_id)
    train = _train_batch(tok)
    with use_bars(Bar):
        curv = inf.fit_curvature(model, task, train, batch_size=8, progress=True)
        result = inf.scan(model, task, curv, inf_queries(tok), train, batch_size=8, progress=True)
        inf.fit_curvature(model, task, train, batch_size=8, progress=False)  # off: no bars
    rows = len(_hit_rows(result))  # the token pass steps once per distinct training sequence among the hits
    assert events == [
        ("covariance", 24, 24),
        ("eigendecomposition", 10, 10),
        ("eigenvalue correction", 24, 24),
        ("query gradients", 2, 2),
        ("scan", 24, 24),
        ("token attribution", rows, rows),
    ]


def _hit_rows(result) -> set[int]:
    """The training sequences among a scan's hits: top, bottom and band lists of every query."""
    from influencer.scan import BANDS

    lists = [result.top(q, **kw) for q in range(result.n_queries) for kw in ({}, {"negative": True})]
    lists += [result.top(q, band=b) for q in range(result.n_queries) for b in BANDS]
    return {h.index for hits in lists for h in hits}


def test_rich_bars_render_and_time_stages():
    from rich.console import Console

    from influencer.cli._progress import _Bars, _Timer
    from influencer.progress import progress_bar, use_bars

    timer = _Timer()
    buffer = Console(file=io.StringIO(), force_terminal=True, width=100)
    bars = _Bars(timer, show=True, console=buffer)
    with bars.progress, use_bars(bars), timer.stage("fit"), progress_bar("covariance", 10) as bar:
        bar.update(10)
    assert [(s.name, s.depth) for s in timer.stages] == [("fit", 0), ("covariance", 1)]
    assert timer.stages[1].detail == "10 seq" and set(timer.as_dict()) == {"fit", "fit/covariance"}
    assert "covariance: 10 seq in" in buffer.file.getvalue()


# ------------------------------------------------------------------------------------------------ helpers


def _copy(src: Path, dst: Path) -> None:
    import shutil

    shutil.copytree(src, dst)


def inf_models_load(folder: Path):
    from influencer.models import load_model

    return load_model(folder)


def _train_batch(tok):
    from influencer.data import make_sequences

    return make_sequences(tok, [v["text"] for v in kjv_verses(24)], max_length=512).batch


def inf_queries(tok):
    from influencer.data import encode_queries

    return encode_queries(tok, QUERIES)[0]
