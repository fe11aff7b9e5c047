"""A byte-level HuggingFace tokenizer built in code: the tiny test model's tokenizer.

259 tokens: ``<pad>`` = 0, ``<bos>`` = 1, ``<eos>`` = 2, then byte ``b`` = ``b + 3``. Every
UTF-8 text round-trips exactly, nothing is downloaded, and the small vocabulary keeps the tiny
model's unembedding (and every test using it) fast.
"""

from __future__ import annotations

import functools
from typing import Any

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
SPECIAL_TOKENS = (PAD, BOS, EOS)
BYTE_OFFSET = len(SPECIAL_TOKENS)


def _byte_symbols() -> list[str]:
    """The printable character that stands for each byte 0..255 in byte-level BPE models.

    Bytes that print as themselves (not whitespace, control or soft hyphen) keep their own
    character; the others take the characters from U+0100 on, in byte order. This is the
    convention of the ``tokenizers`` ByteLevel pre-tokenizer, which the tokenizer below uses.
    """
    symbols: list[str] = []
    shifted = 0
    for b in range(256):
        c = chr(b)
        if c.isprintable() and not c.isspace() and b != 0xAD:
            symbols.append(c)
        else:
            symbols.append(chr(256 + shifted))
            shifted += 1
    return symbols


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for b, symbol in enumerate(_byte_symbols()):
        vocab[symbol] = BYTE_OFFSET + b
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))  # no merges: one token per byte
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok.to_str()


def byte_tokenizer() -> Any:
    """A fresh HuggingFace fast tokenizer over bytes (adds ``<bos>`` when special tokens are on)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        bos_token=BOS, eos_token=EOS, pad_token=PAD, add_bos_token=True,
        name_or_path="sae-sweep-bytes", model_max_length=1 << 30,
    )
