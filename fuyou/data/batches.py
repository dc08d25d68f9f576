"""The batches a trainer draws: training batches and held-out evaluation batches for a config."""

from __future__ import annotations

import sys

from fuyou.data.dataset import BatchSampler, EvalBatches, SyntheticBatches, TokenData
from fuyou.data.examples import ExampleData, ExampleEvalBatches, ExampleSampler, Rows
from fuyou.errors import ConfigError


def check_sequence_length(cfg) -> None:
    """Refuse a ``data.seq_len`` beyond a GPT's position table (a config mistake, which the engine
    reports before it plans memory for that length)."""
    seq = cfg.data.seq_len
    if seq > cfg.model.max_seq_len and cfg.model.family == "gpt":
        how = (f"the checkpoint model.init_from has {cfg.model.max_seq_len} learned positions: lower data.seq_len to "
               f"at most that" if cfg.model.init_from else "lower data.seq_len or raise model.max_seq_len")
        raise ConfigError(f"data.seq_len={seq} exceeds model.max_seq_len={cfg.model.max_seq_len} (the GPT position "
                          f"table); {how}")


def make_batches(cfg, data: TokenData | ExampleData | None, quiet: bool = False):
    """The training batches of a ``FuyouConfig`` (synthetic when ``data`` is None) and the evaluation
    batches (None when there are none), after checking that the sequence length and the vocabulary fit
    the model (the tokenizer: ``fuyou.train.records.check_tokenizer``)."""
    t, seq = cfg.train, cfg.data.seq_len
    check_sequence_length(cfg)
    if data is None:
        train = SyntheticBatches(cfg.model.vocab_size, seq, t.micro_batch_size, t.seed)
        return train, None
    if isinstance(data, ExampleData):
        data.check_fits(seq, cfg.model.vocab_size)
        rows = Rows.build(data.train, seq, cfg.data.packing, data.pad_id, t.seed)
        held = Rows.build(data.val, seq, cfg.data.packing, data.pad_id, None)
        if not quiet:
            print(f"fuyou: data: {rows.report()}; held out: {held.report()}", file=sys.stderr)
        evals = ExampleEvalBatches(held, t.micro_batch_size, t.eval_batches) if len(held) else None
        if evals is None and not quiet:
            why = (f"no held-out example has an answer token within data.seq_len={seq}" if len(data.val) else
                   "the prepared data holds no held-out example" if cfg.data.source == "prepared" else
                   "no example is held out (data.val_fraction=0)" if cfg.data.val_fraction == 0 else
                   f"no example is held out ({len(data.train)} in all: data.val_fraction holds out none of so few)")
            print(f"fuyou: note: {why}: evaluation is off; give data.eval_path a file of examples"
                  + (" that fit, or a larger data.seq_len" if len(data.val) else ""), file=sys.stderr)
        _note_repeats(cfg, len(rows), "rows", quiet)
        return ExampleSampler(rows, t.micro_batch_size, t.seed), evals
    data.check_fits(seq, cfg.model.vocab_size)
    train = BatchSampler(data.train, seq, t.micro_batch_size, t.seed)
    if len(data.val) < seq + 1:  # too little held out for one sequence: no evaluation, not no training
        if not quiet and not len(data.val) and cfg.data.val_fraction == 0:
            print("fuyou: note: nothing is held out (data.val_fraction=0): evaluation is off", file=sys.stderr)
        elif not quiet:
            how = ("prepare the data again with a larger --val-fraction" if cfg.data.source == "prepared" else
                   "raise data.val_fraction")
            print(f"fuyou: note: the held-out split has {len(data.val)} tokens, fewer than one sequence of "
                  f"{seq}+1: evaluation is off; {how}, give data.eval_path, or lower data.seq_len", file=sys.stderr)
        return train, None
    asked = t.eval_batches * t.micro_batch_size * (seq + 1)
    if asked > len(data.val) and not quiet:  # evenly spaced windows, then overlapping: tokens counted again
        fit = max(1, len(data.val) // ((seq + 1) * t.micro_batch_size))
        print(f"fuyou: note: train.eval_batches={t.eval_batches} of {t.micro_batch_size} x {seq} tokens ask for "
              f"{asked:,} held-out tokens, the split has {len(data.val):,}: its windows overlap, each token counted "
              f"about {asked / len(data.val):.1f} times; train.eval_batches={fit} measures the same tokens once",
              file=sys.stderr)
    return train, EvalBatches(data.val, seq, t.micro_batch_size, t.eval_batches)


def _note_repeats(cfg, n: int, what: str, quiet: bool) -> None:
    """A step that draws more sequences than the data has repeats them within the step: said once."""
    t = cfg.train
    per_step = t.micro_batch_size * t.grad_accum
    if 0 < n < per_step and not quiet:  # (no row at all: ExampleSampler refuses the run)
        print(f"fuyou: note: the data makes {n} {what} of {cfg.data.seq_len} tokens and a step draws {per_step} "
              f"(train.micro_batch_size x train.grad_accum): each step repeats them about {per_step / n:.1f} times; "
              f"lower train.micro_batch_size or give more data", file=sys.stderr)
