"""The batches a trainer draws: training batches and held-out evaluation batches for a config."""

from __future__ import annotations

from fuyou.data.dataset import BatchSampler, EvalBatches, SyntheticBatches, TokenData
from fuyou.errors import ConfigError


def make_batches(cfg, data: TokenData | None) -> tuple[BatchSampler | SyntheticBatches, EvalBatches | None]:
    """The training batches of a ``FuyouConfig`` (synthetic when ``data`` is None) and the evaluation
    batches, after checking that the sequence length and the vocabulary fit the model."""
    t, seq = cfg.train, cfg.data.seq_len
    if seq > cfg.model.max_seq_len and cfg.model.family == "gpt":
        raise ConfigError(
            f"data.seq_len={seq} exceeds model.max_seq_len={cfg.model.max_seq_len} "
            f"(the GPT position table); lower data.seq_len or raise model.max_seq_len"
        )
    if data is None:
        train = SyntheticBatches(cfg.model.vocab_size, seq, t.micro_batch_size, t.seed)
        return train, None
    data.check_fits(seq, cfg.model.vocab_size)
    return BatchSampler(data.train, seq, t.micro_batch_size, t.seed), EvalBatches(data.val, seq, t.micro_batch_size, t.eval_batches)


