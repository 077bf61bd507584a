"""Layer selection: presets per architecture, names, regex, errors, output heads never tracked by default."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

import influencer as inf
from influencer.layers import candidate_layers


def llama() -> nn.Module:
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=32,
            hidden_size=8,
            intermediate_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
        )
    )


def gpt2() -> nn.Module:
    return GPT2LMHeadModel(GPT2Config(vocab_size=32, n_embd=8, n_layer=2, n_head=2, n_positions=16))


def neox() -> nn.Module:
    return GPTNeoXForCausalLM(
        GPTNeoXConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2)
    )


@pytest.mark.parametrize(
    ("build", "mlp", "attention"),
    [
        (llama, {"gate_proj", "up_proj", "down_proj"}, {"q_proj", "k_proj", "v_proj", "o_proj"}),
        (gpt2, {"c_fc", "c_proj"}, {"c_attn", "c_proj"}),
        (neox, {"dense_h_to_4h", "dense_4h_to_h"}, {"query_key_value", "dense"}),
    ],
)
def test_presets(build, mlp: set[str], attention: set[str]) -> None:
    model = build()
    got_mlp = inf.select_layers(model, "mlp")
    got_attn = inf.select_layers(model, "attention")
    assert {x.name.rsplit(".", 1)[1] for x in got_mlp} == mlp
    assert {x.name.rsplit(".", 1)[1] for x in got_attn} == attention
    assert len(got_mlp) == 2 * len(mlp)
    everything = inf.select_layers(model, "all")
    assert {x.name for x in everything} == {x.name for x in got_mlp} | {x.name for x in got_attn}
    for layers in (got_mlp, got_attn, everything):
        assert not any("lm_head" in x.name or "embed" in x.name for x in layers)
    # the head exists as a candidate (it can be named explicitly), just not in presets
    assert any(x.name in ("lm_head", "embed_out") for x in candidate_layers(model))


def test_gpt2_conv1d_shapes_are_out_by_in() -> None:
    model = gpt2()
    fc = {x.name: x for x in inf.select_layers(model, "mlp")}["transformer.h.0.mlp.c_fc"]
    assert fc.kind == "conv1d"
    assert fc.shape == (32, 8 + 1)  # d_out = 4 * n_embd, d_in = n_embd, + bias


def test_names_regex_predicate_and_errors() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2, bias=False))
    assert [x.name for x in inf.select_layers(model, "all")] == ["0", "2"]
    assert [x.name for x in inf.select_layers(model, ["2"])] == ["2"]
    assert [x.name for x in inf.select_layers(model, r"^2$")] == ["2"]
    assert [x.name for x in inf.select_layers(model, lambda n, m: m.bias is not None)] == ["0"]
    assert inf.select_layers(model, ["2"])[0].shape == (2, 4)
    with pytest.raises(ValueError, match=r"candidates: 0 \[4x3\], 2 \[2x4\]"):
        inf.select_layers(model, "mlp")
    with pytest.raises(ValueError, match=r"not nn\.Linear/Conv1D"):
        inf.select_layers(model, ["1"])
    with pytest.raises(ValueError, match="matched no layer"):
        inf.select_layers(model, "nothing_like_this")


def test_linear_subclass_is_tracked() -> None:
    class MyLinear(nn.Linear):
        pass

    model = nn.Sequential(MyLinear(3, 4))
    assert [x.name for x in inf.select_layers(model)] == ["0"]


def test_tied_embedding_head_excluded() -> None:
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=32,
            hidden_size=8,
            intermediate_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            tie_word_embeddings=True,
        )
    )
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert "lm_head" not in {x.name for x in inf.select_layers(model, "all")}


def test_default_preset_is_mlp_for_hf_causal_lm() -> None:
    model = llama()
    assert inf.CausalLM().default_layers(model) == "mlp"
    assert inf.Regression().default_layers(torch.nn.Linear(2, 2)) == "all"
