"""Tiny random backbones with a character tokenizer: fast, offline, deterministic."""

from __future__ import annotations

import string

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from clp.backbones import Backbone

torch.set_num_threads(1)  # tiny models gain nothing from threads; the integration fixture resets

SPECIALS = ["<pad>", "<s>", "</s>"]
CHARS = list(string.ascii_letters + string.digits + string.punctuation + " \n")


def make_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


def make_tiny_backbone(
    seed: int = 0, context: int = 256, dtype=torch.float32, **sizes: int
) -> Backbone:
    """``sizes`` override the LlamaConfig widths (hidden_size, num_attention_heads, ...)."""
    torch.manual_seed(seed)
    tokenizer = make_tokenizer()
    widths = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4) | sizes
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        num_hidden_layers=2,
        num_key_value_heads=2,
        max_position_embeddings=context,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
        **widths,
    )
    model = LlamaForCausalLM(config).to(dtype).eval().requires_grad_(False)
    return Backbone(name="tiny", model=model, tokenizer=tokenizer, dtype=dtype)


@pytest.fixture(scope="session")
def tiny() -> Backbone:
    return make_tiny_backbone()


@pytest.fixture(scope="session")
def smollm2_fp32() -> Backbone:
    from clp.backbones import load_backbone

    torch.set_num_threads(2)
    return load_backbone("smollm2-135m", "fp32")
