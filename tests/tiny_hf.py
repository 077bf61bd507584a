"""A tiny Hugging Face causal-LM folder built offline: a random Llama + a byte-level BPE tokenizer.

``tiny_model_folder(path)`` writes ``config.json``, ``model.safetensors`` and the tokenizer files with
``save_pretrained``, exactly what ``influencer.models.load_model`` reads from any local model folder. The tokenizer
is trained on the first 200 KJV verses (under a second) and has ``<pad>``, ``<s>``, ``</s>`` and a chat template.
"""

from __future__ import annotations

from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant:{% endif %}"
)


def byte_bpe_tokenizer(texts: list[str], vocab_size: int = 300):
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained on ``texts`` (pad=0, bos=1, eos=2)."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_model_folder(path: Path, *, seed: int = 0, tokenizer=None, hidden: int = 16, layers: int = 2) -> Path:
    """Save a random tiny ``LlamaForCausalLM`` (float32) and its tokenizer into ``path``."""
    import transformers

    from influencer.data import kjv_verses

    if tokenizer is None:
        tokenizer = byte_bpe_tokenizer([v["text"] for v in kjv_verses(200)])
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
