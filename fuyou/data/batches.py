"""The batches a trainer draws: training batches and held-out evaluation batches for a config."""

from __future__ import annotations

import sys

from fuyou.data.dataset import BatchSampler, EvalBatches, SyntheticBatches, TokenData
from fuyou.data.examples import ExampleData, ExampleEvalBatches, ExampleSampler, Rows
from fuyou.errors import ConfigError, DataError


def make_batches(cfg, data: TokenData | ExampleData | None, quiet: bool = False):
    """The training batches of a ``FuyouConfig`` (synthetic when ``data`` is None) and the evaluation
    batches (None when there are none), after checking that the sequence length, the vocabulary and
    the tokenizer fit the model."""
    t, seq = cfg.train, cfg.data.seq_len
    if seq > cfg.model.max_seq_len and cfg.model.family == "gpt":
        raise ConfigError(
            f"data.seq_len={seq} exceeds model.max_seq_len={cfg.model.max_seq_len} "
            f"(the GPT position table); lower data.seq_len or raise model.max_seq_len"
        )
    if data is None:
        train = SyntheticBatches(cfg.model.vocab_size, seq, t.micro_batch_size, t.seed)
        return train, None
    check_tokenizer(cfg, data)
    if isinstance(data, ExampleData):
        data.check_fits(seq, cfg.model.vocab_size)
        rows = Rows.build(data.train, seq, cfg.data.packing, data.pad_id, t.seed)
        held = Rows.build(data.val, seq, cfg.data.packing, data.pad_id, None)
        if not quiet:
            print(f"fuyou: data: {rows.report()}; held out: {held.report()}", file=sys.stderr)
        evals = ExampleEvalBatches(held, t.micro_batch_size, t.eval_batches) if len(held) else None
        return ExampleSampler(rows, t.micro_batch_size, t.seed), evals
    data.check_fits(seq, cfg.model.vocab_size)
    return BatchSampler(data.train, seq, t.micro_batch_size, t.seed), EvalBatches(data.val, seq, t.micro_batch_size, t.eval_batches)


def check_tokenizer(cfg, data: TokenData | ExampleData) -> None:
    """Data tokenized with another vocabulary than the model's trains silently into nonsense: when the
    model starts from a checkpoint with a tokenizer, the data must have been made with that tokenizer
    (the same vocabulary, compared by fingerprint: ``fuyou.data.tokenizer``)."""
    if not cfg.model.init_from:
        return
    from fuyou.hf.source import tokenizer_dir

    tok_dir = tokenizer_dir(cfg.model.init_from)
    if tok_dir is None or data.tokenizer == f"hf:{tok_dir}":
        return
    if data.tokenizer == "byte":
        raise DataError(f"the data was tokenized byte by byte, but model.init_from={cfg.model.init_from} was trained "
                        f"with the tokenizer in {tok_dir}; prepare the data with it (`fuyou data prepare ... "
                        f"--tokenizer {tok_dir}`) or leave data.tokenizer at 'auto'")
    from fuyou.data.tokenizer import HFTokenizer

    want = HFTokenizer(tok_dir).fingerprint
    if data.fingerprint != want:
        raise DataError(f"the data was tokenized with {data.tokenizer} (vocabulary {data.fingerprint or 'unknown'}), "
                        f"but model.init_from={cfg.model.init_from} uses the tokenizer in {tok_dir} (vocabulary "
                        f"{want}); prepare the data again with --tokenizer {tok_dir}")
