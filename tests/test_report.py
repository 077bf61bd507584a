"""HTML report of a real (tiny) scan: structure, token heatmap colours and values, escaping of hostile text,
offline self-containment, atomic write, and a real headless-browser render (Debian's chromium)."""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
import zoo
from markupsafe import escape

pytest.importorskip("jinja2")
pytest.importorskip("matplotlib")
pytest.importorskip("powerlaw")

import influencer as inf
import influencer.analysis.tails
import influencer.report.html
from influencer.analysis import query_tail_stats, tail_stats
from influencer.report import write_report
from influencer.units import cg_steps

HOSTILE = "<script>alert(1)</script>"
QUOTES = "\"&'"
N_TRAIN, T, TOP = 40, 10, 6


def _vocab() -> list[str]:
    words = [f"w{i} " for i in range(64)]
    for i in range(0, 64, 4):
        words[i] = HOSTILE  # every 4th token id: frequent in every hit
    for i in range(1, 64, 8):
        words[i] = QUOTES
    words[2] = "\n"
    words[3] = ""
    words[6] = '<img src=x onerror="alert(2)">'
    return words


VOCAB = _vocab()
QUERIES = [
    {"prompt": f"In the <b>beginning</b> {HOSTILE}", "completion": f" God {QUOTES}"},
    {"prompt": "second query ", "completion": "</span></div><script>alert(3)</script>"},
]


@pytest.fixture(scope="module")
def scans():
    model = zoo.tiny_llama(hidden=16, intermediate=32, layers=2)
    task = inf.CausalLM()
    train = zoo.token_data(N_TRAIN, t=T)
    queries = {"input_ids": zoo.token_data(2, t=8, seed=3), "prompt_length": torch.tensor([3, 4])}
    curv = inf.fit_curvature(model, task, train, progress=False)
    kw = {"rank": 8, "top_k": TOP, "batch_size": 20, "progress": False}
    # hits corrected for their own curvature (forced: too small a corpus to pay for it)
    full = inf.scan(model, task, curv, queries, train, keep_scores=True, self_correct=True, **kw)
    plain = inf.scan(model, task, curv, queries, train, tokens=False, candidates=torch.arange(0, N_TRAIN, 2), **kw)
    return train, full, plain


def tokens_of(train):
    return lambda i: [VOCAB[j] for j in train[i].tolist()]


class Page(HTMLParser):
    """Every start tag (name, attributes) in document order, and the text inside token spans."""

    def __init__(self, html: str):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.token_text: list[str] = []
        self.h2: list[str] = []
        self._in: str | None = None
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        if tag == "span" and a.get("class") == "tok":
            self._in, self._buf = "tok", ""
        elif tag == "h2":
            self._in, self._buf = "h2", ""

    def handle_data(self, data):
        if self._in:
            self._buf += data

    def handle_endtag(self, tag):
        if self._in == "tok" and tag == "span":
            self.token_text.append(self._buf)
            self._in = None
        elif self._in == "h2" and tag == "h2":
            self.h2.append(self._buf)
            self._in = None

    def find(self, tag: str, **attrs: str) -> list[dict[str, str | None]]:
        return [a for t, a in self.tags if t == tag and all(a.get(k) == v for k, v in attrs.items())]


def _shown(result, q: int, k: int) -> tuple[list, list]:
    """The hits a page lists for query q: the top k of each sign, each list holding only hits of its sign."""
    return [h for h in result.top(q, k) if h.score > 0], [h for h in result.top(q, k, negative=True) if h.score < 0]


def _write(tmp_path: Path, result, train, name: str, **kw) -> tuple[Path, str]:
    path = write_report(result, tmp_path / name, queries=QUERIES, train_tokens=tokens_of(train), **kw)
    return path, path.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def full_report(scans, tmp_path_factory):
    train, full, _ = scans
    tmp = tmp_path_factory.mktemp("report")
    path, html = _write(
        tmp,
        full,
        train,
        "full.html",
        train_text=lambda i: f"text {i} {HOSTILE}",
        train_source=lambda i: f"file.txt:{i + 1} {HOSTILE}",
        notes=["run: rank 8, ekfac", f"hostile note {HOSTILE}"],
        top=5,
    )
    return path, html


def _assert_safe(html: str) -> None:
    """No tag or attribute from data survives: no <script>, no event handlers, images only as data URIs."""
    page = Page(html)
    names = {t for t, _ in page.tags}
    assert "script" not in names and "iframe" not in names and "link" not in names
    assert not re.search(r"<\s*script", html, re.IGNORECASE)
    for tag, attrs in page.tags:
        assert not any(k.startswith("on") for k in attrs), (tag, attrs)
        if tag == "img":
            assert (attrs.get("src") or "").startswith("data:image/png;base64,")
        if tag == "a":
            assert (attrs.get("href") or "").startswith("#")
    assert "http://" not in html and "https://" not in html  # fully offline: nothing external


def test_structure_and_token_heatmaps(scans, full_report) -> None:
    train, full, _ = scans
    path, html = full_report
    assert path.name == "full.html" and not list(path.parent.glob(".full.html.*"))  # atomic: no temp left
    page = Page(html)
    assert page.h2 == ["Query 1", "Query 2"]  # numbered from 1, as on the command line; anchors keep the index
    assert len(page.find("section", id="query-0")) == 1 and len(page.find("section", id="query-1")) == 1
    spans = page.find("span", **{"class": "tok"})
    n_spans = 0
    for q in range(2):
        hits, neg = _shown(full, q, 5)
        assert len(page.find("article", id=f"hit-{q}-{hits[0].index}")) == 1
        assert all(f"file.txt:{h.index + 1} " in html for h in hits + neg)  # each hit's source in its header
        assert sum(a.get("id", "").startswith(f"hit-{q}-") for _, a in page.tags if _ == "article") == len(hits)
        assert sum(a.get("id", "").startswith(f"neg-{q}-") for _, a in page.tags if _ == "article") == len(neg)
        n_spans += sum(len(h.tokens) for h in hits + neg)
    assert len(spans) == n_spans
    # the first hit of query 0: one span per token, colour ∝ |I_t| / max |I_t|, red > 0, blue < 0, value on hover
    hit = full.top(0, 1)[0]
    values = hit.tokens.tolist()
    peak = max(abs(v) for v in values)
    first = spans[: len(values)]
    assert page.token_text[: len(values)] == [VOCAB[j] or "\u2205" for j in train[hit.index].tolist()]
    for pos, (v, a) in enumerate(zip(values, first, strict=True)):
        rgb = "198, 40, 40" if v > 0 else "21, 101, 192"
        assert f"rgba({rgb}, {abs(v) / peak:.3f})" in a["style"]
        assert a["title"] == f"I_t = {v:+.4g} (position {pos})"
    assert sum(abs(v) == peak for v in values) >= 1 and any("1.000)" in a["style"] for a in first)
    # plots: per query a tail plot, a layer profile and up to 3 layer × token heatmaps
    assert len(page.find("img")) == 2 * (2 + 3)
    assert "BM25 prefilter" not in html and "hostile note" in html and "run: rank 8, ekfac" in html
    assert "power-law exponent" in html or "No power-law fit" in html
    inverse = full.meta["inverse"]
    assert inverse["inverse"] == "refined"  # refined and corrected: the summary says how, and values are nats
    assert f"{cg_steps(inverse['steps'])} over {inverse['data_size']} training sequences" in html
    assert "nats" in html and "(score)" not in html


def test_hostile_text_is_escaped(full_report) -> None:
    _, html = full_report
    _assert_safe(html)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html  # shown as text, in tokens, notes, queries, texts
    assert "&lt;/span&gt;&lt;/div&gt;&lt;script&gt;alert(3)&lt;/script&gt;" in html
    assert "&lt;img src=x onerror=" in html
    assert "&#34;&amp;&#39;" in html  # "&' in token strings and the completion
    assert "<b>beginning</b>" not in html and "&lt;b&gt;beginning&lt;/b&gt;" in html


def test_totals_only_prefiltered_and_plain_text(scans, tmp_path) -> None:
    """tokens=False: plain text with a note; no full scores: totals + a note; prefilter: a visible warning."""
    train, _, plain = scans
    _, html = _write(tmp_path, plain, train, "plain.html", top=4)
    _assert_safe(html)
    page = Page(html)
    assert len(page.find("div", id="prefilter-note")) == 1 and "may be biased" in html
    assert not page.find("span", **{"class": "tok"})
    assert html.count("no token scores (the scan ran with tokens=False)") == sum(
        len(a) + len(b) for a, b in (_shown(plain, q, 4) for q in range(2))
    )
    assert "Full scores were not kept" in html
    assert len(page.find("img")) == 2  # a layer profile per query; no tail plot without full scores
    # the plain text falls back to the joined token strings when no train_text is given, escaped
    joined = "".join(VOCAB[j] for j in train[plain.top(0, 1)[0].index].tolist())
    assert str(escape(joined)) in html


def test_length_mismatch_directory_path_and_errors(scans, tmp_path, monkeypatch) -> None:
    train, full, _ = scans
    monkeypatch.setattr(influencer.analysis.tails, "ALTERNATIVES", ())  # speed: comparisons are tested elsewhere
    monkeypatch.setattr(influencer.report.html, "HEATMAP_HITS", 0)

    def short(i: int) -> list[str]:
        return tokens_of(train)(i)[:-2] if i % 2 else tokens_of(train)(i)

    path = write_report(full, tmp_path, queries=QUERIES, train_tokens=short, top=3)
    assert path == tmp_path / "report.html"
    html = path.read_text(encoding="utf-8")
    shown = [h for q in range(2) for part in _shown(full, q, 3) for h in part]
    n_short = sum(h.index % 2 for h in shown)
    assert html.count(f"{T - 2} token strings but {T} token scores: showing the first {T - 2} of each") == n_short
    assert len(Page(html).find("span", **{"class": "tok"})) == sum(T - 2 if h.index % 2 else T for h in shown)
    with pytest.raises(ValueError, match="queries"):
        write_report(full, tmp_path / "x.html", queries=QUERIES[:1], train_tokens=short)
    with pytest.raises(ValueError, match="completion"):
        write_report(full, tmp_path / "x.html", queries=[{"prompt": "a"}] * 2, train_tokens=short)
    assert not (tmp_path / "x.html").exists()


def test_query_tail_stats_from_a_scan(scans) -> None:
    _, full, plain = scans
    a = query_tail_stats(full, 0, compare=False)
    b = tail_stats(full.scores[0], compare=False)
    assert a.source == "scores" and a.to_dict() == b.to_dict()
    assert a.positive_total == pytest.approx(full.stats(0)["positive_sum"], rel=1e-9)
    c = query_tail_stats(plain, 0, compare=False)
    assert c.source == "totals" and c.n == int(plain.stats(0)["count"]) == N_TRAIN // 2
    assert c.max_score == pytest.approx(plain.top(0, 1)[0].score)


class _Tokenizer:
    """Stands in for the README's Hugging Face tokenizer: decode(ids) → text."""

    def decode(self, ids: list[int]) -> str:
        return "".join(VOCAB[i] for i in ids)


def test_readme_report_example_runs(tmp_path, monkeypatch) -> None:
    """The README's report block runs as written on a one-query tiny scan (names from the scan example)."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    block = re.search(r"```python\n(.*?)```", text.split("## Report and analysis", 1)[1], re.S)
    assert block is not None, "README lost its report example"
    model = zoo.tiny_llama(hidden=16, intermediate=32, layers=2)
    task = inf.CausalLM()
    ids = zoo.token_data(N_TRAIN, t=T)
    mask = torch.ones_like(ids)
    mask[::3, -2:] = 0  # right padding on some rows
    train = {"input_ids": ids, "attention_mask": mask}
    curv = inf.fit_curvature(model, task, train, progress=False)
    query = {"input_ids": zoo.token_data(1, t=8, seed=3), "prompt_length": torch.tensor([3])}
    result = inf.scan(model, task, curv, query, train, rank=8, top_k=10, batch_size=20, progress=False)
    monkeypatch.chdir(tmp_path)
    namespace = {"result": result, "train": train, "tok": _Tokenizer()}
    exec(compile(block.group(1), "README report example", "exec"), namespace)
    html = (tmp_path / "run" / "report.html").read_text(encoding="utf-8")
    assert namespace["page"] == Path("run/report.html") and "SmolLM2-135M" in html
    assert "token strings but" not in html  # the README's train_tokens aligns with hit.tokens (padding dropped)
    assert namespace["tail"].source == "totals"


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def test_renders_in_headless_chromium(full_report, tmp_path) -> None:
    if CHROMIUM is None:
        if os.environ.get("INFLUENCER_REQUIRE_BROWSER"):  # CI sets it: there the browser test must run
            pytest.fail("chromium is not installed but INFLUENCER_REQUIRE_BROWSER is set")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    """A real browser parses the page: the DOM holds every token span and both query headings and no script
    element; a 1280 × 2000 screenshot is written."""
    path, html = full_report
    flags = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    url = path.resolve().as_uri()
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=180)
    assert dom.returncode == 0, dom.stderr[-2000:]
    page = Page(dom.stdout)
    assert len(page.find("span", **{"class": "tok"})) == len(Page(html).find("span", **{"class": "tok"})) > 0
    assert "Query 1" in page.h2 and "Query 2" in page.h2
    assert not any(t == "script" for t, _ in page.tags)
    assert HOSTILE in "".join(page.token_text)  # hostile token strings arrive as text
    shot = tmp_path / "report.png"
    run = subprocess.run(
        [*flags, f"--screenshot={shot}", "--window-size=1280,2000", url], capture_output=True, text=True, timeout=180
    )
    assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (1280, 2000)
