"""Corpora, tokenizers, token memmaps and deterministic batch sampling."""

from __future__ import annotations

import numpy as np

from fuyou.data.config import DataConfig
from fuyou.data.corpus import builtin_documents, iter_documents
from fuyou.data.dataset import BatchSampler, EvalBatches, SyntheticBatches, TokenData, read_prepared, split_tokens
from fuyou.data.tokenizer import ByteTokenizer, load_tokenizer

__all__ = [
    "BatchSampler", "ByteTokenizer", "DataConfig", "EvalBatches", "SyntheticBatches", "TokenData",
    "load_data", "load_tokenizer", "tokenize_documents",
]


def tokenize_documents(docs, tokenizer_spec: str, val_fraction: float) -> TokenData:
    tok = load_tokenizer(tokenizer_spec)
    if isinstance(tok, ByteTokenizer):
        arrays = [tok.encode_np(d) for d in docs]
    else:
        arrays = [np.asarray(tok.encode(d), dtype=np.int64) for d in docs]
    train, val = split_tokens(arrays, tok.eos_id, val_fraction)
    return TokenData(train, val, tok.vocab_size, tok.eos_id, tok.name)


def load_data(cfg: DataConfig) -> TokenData | None:
    """Token streams for ``cfg`` (None for synthetic data, which needs no tokens)."""
    if cfg.source == "synthetic":
        return None
    if cfg.source == "prepared":
        return read_prepared(cfg.path[0])
    docs = builtin_documents() if cfg.source == "builtin" else list(iter_documents(cfg.path, cfg.jsonl_field))
    return tokenize_documents(docs, cfg.tokenizer, cfg.val_fraction)
