"""Fine-tuning examples: token sequences with a loss mask, packed or padded into rows, drawn by epoch.

An example is one record rendered (``fuyou.data.formats``): tokens ``t0 .. tn`` and a flag per token
saying whether it is a target that carries loss. Row ``r`` of a batch holds whole examples: example
``t`` contributes inputs ``t[:-1]``, targets ``t[1:]`` (``IGNORE`` where the flag is off) and positions
``0 .. n-1``. So a target is always the next token *of the same example*: nothing predicts across a
document boundary.

- Packing (``data.packing=true``, the default): examples are laid one after another into rows of
  ``seq_len`` tokens, in a seeded order, starting a new row when the next example does not fit (next
  fit). Positions restart at each example, and the blocks mask attention across examples
  (``fuyou.models.layers.attention_mask``), so a packed example computes exactly what it computes alone
  (tests/data). The rest of a row is padding: its own "document", no loss.
- Padding (``data.packing=false``): one example per row, padded on the right; causal attention never
  looks right, so no mask is needed (positions None: the fast kernel).
- An example longer than ``seq_len + 1`` tokens is cut to its first ``seq_len + 1``; one with no target
  carrying loss in what is left is dropped (both counted in ``Rows.report``).

Epochs: batch ``i`` holds rows ``i*B .. i*B+B-1`` of the endless sequence of epochs, each epoch a
seeded permutation of the rows, so a batch is a pure function of (seed, i) and resuming costs no state,
as for text (``fuyou.data.dataset``).

On disk (``fuyou data prepare``): ``{split}.bin`` (token ids), ``{split}.loss.bin`` (uint8 flags),
``{split}.idx.bin`` (int64 offsets of the examples, n + 1), described by ``meta.json``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fuyou.data.dataset import IGNORE, META, Batch, beyond_vocab, content_hash
from fuyou.errors import DataError


@dataclass
class Examples:
    """Examples of one split, flat: ``tokens`` and ``loss`` (1: a target with loss) of equal length,
    example ``k`` at ``offsets[k] : offsets[k + 1]``."""

    tokens: np.ndarray
    loss: np.ndarray
    offsets: np.ndarray

    @classmethod
    def from_arrays(cls, examples: list[tuple[np.ndarray, np.ndarray]], dtype: np.dtype) -> "Examples":
        """From (token ids, loss flags) per example (``formats.Rendered.arrays``), ids stored as ``dtype``
        (``dataset.token_dtype``: the same for every split)."""
        lengths = np.array([len(ids) for ids, _ in examples], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        tokens, loss = np.empty(int(offsets[-1]), dtype), np.empty(int(offsets[-1]), np.uint8)
        for (ids, flags), a, b in zip(examples, offsets[:-1].tolist(), offsets[1:].tolist()):  # (no joined copies)
            tokens[a:b] = ids
            loss[a:b] = flags
        return cls(tokens, loss, offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def shared_with(self, other: "Examples") -> int:
        """How many of these examples are (token for token) also examples of ``other``: a held-out split
        that repeats training examples measures memorisation (a copy of the training file under another
        name, which a path cannot tell)."""
        def keys(ex):  # one example at a time (a training split may be far larger than memory)
            return (ex.tokens[a:b].astype(np.int64).tobytes() for a, b in zip(ex.offsets[:-1], ex.offsets[1:]))
        mine = list(keys(self))  # the held-out split: the small one
        wanted = set(mine)
        found = {k for k in keys(other) if k in wanted}
        return sum(k in found for k in mine)

    @property
    def loss_tokens(self) -> int:
        """Targets that carry loss (an example's first token is never a target)."""
        first = self.offsets[:-1][self.offsets[:-1] < self.offsets[1:]]
        return int(self.loss.sum()) - int(self.loss[first].sum())

    @property
    def targets(self) -> int:
        return int(len(self.tokens) - np.count_nonzero(self.offsets[1:] > self.offsets[:-1]))


@dataclass
class ExampleData:
    """Train and held-out examples, and the tokenizer that made them."""

    train: Examples
    val: Examples
    vocab_size: int
    eos_id: int
    pad_id: int
    tokenizer: str
    fingerprint: str
    info: dict  # what rendering did (formats, records, conversations masked on their last turn only)

    def check_fits(self, seq_len: int, model_vocab: int) -> None:
        for name, ex in (("train", self.train), ("val", self.val)):
            top = int(ex.tokens.max()) if len(ex.tokens) else 0
            if top >= model_vocab:
                raise DataError(beyond_vocab(name, top, model_vocab, self.vocab_size, self.tokenizer))
        if self.eos_id >= model_vocab:
            raise DataError(beyond_vocab("end-of-sequence token", self.eos_id, model_vocab, self.vocab_size,
                                         self.tokenizer))
        if self.pad_id >= model_vocab:  # (an added [PAD]: padding carries no loss, the EOS token pads as well)
            self.pad_id = self.eos_id

    def summary(self) -> str:
        ex = self.train
        share = ex.loss_tokens / max(1, ex.targets)
        return (f"{len(ex)} train and {len(self.val)} held-out examples, {len(ex.tokens)} train tokens, "
                f"{100 * share:.1f}% of targets carry loss")


def prefix_sums(flags: np.ndarray, at: list[np.ndarray], block: int = 1 << 20) -> list[np.ndarray]:
    """``sum(flags[:i])`` (int64) for each index ``i`` of each array of ``at`` (an index past the end: the whole
    sum), reading ``flags`` a ``block`` at a time. (``np.add.reduceat(..., dtype=int64)`` over the loss flags cast
    the whole uint8 array to int64 first: 9 B a training token above the CPU budget, 887 MiB on a 131M-token set,
    in a pass; here a block's cumulative sums and numpy's cast of it, 16 MiB, are the most held for the tokens,
    beside about 100 B an index for the indices' order and sums.)"""
    n = len(flags)
    flat = np.minimum(np.concatenate(at) if at else np.zeros(0, np.int64), n).astype(np.int64)
    order = np.argsort(flat, kind="stable")
    q = flat[order]
    out = np.empty(len(flat), np.int64)
    total, j = 0, 0
    for lo in range(0, n + 1, block):
        hi = min(lo + block, n)
        k = np.searchsorted(q, hi, side="right") if hi == n else np.searchsorted(q, hi, side="left")
        csum = np.cumsum(flags[lo:hi], dtype=np.int64)
        rel = q[j:k] - lo  # each index's place in this block: the sum of the flags before it
        out[order[j:k]] = total + np.where(rel > 0, csum[np.maximum(rel - 1, 0)] if len(csum) else 0, 0)
        total += int(csum[-1]) if len(csum) else 0
        j = k
        del csum  # (before the next block's: two were held)
        if hi == n:
            break
    return np.split(out, np.cumsum([len(a) for a in at])[:-1]) if at else []


@dataclass
class Rows:
    """Examples laid into rows (module docstring): row ``r`` holds examples ``order[ptr[r]:ptr[r+1]]``,
    each cut to ``keep`` tokens."""

    ex: Examples
    order: np.ndarray
    ptr: np.ndarray
    keep: np.ndarray
    seq_len: int
    packed: bool
    pad_id: int
    truncated: int
    dropped: int
    cut_tokens: int = 0        # tokens of the usable examples beyond seq_len + 1 (lost to the cut)
    cut_loss_tokens: int = 0   # of those, targets that carried loss
    total_tokens: int = 0      # tokens of the usable examples before the cut
    total_loss_tokens: int = 0

    @classmethod
    def build(cls, ex: Examples, seq_len: int, packed: bool, pad_id: int, seed: int | None) -> "Rows":
        lengths = np.diff(ex.offsets)
        keep = np.minimum(lengths, seq_len + 1)
        starts = ex.offsets[:-1]
        # targets with loss among tokens 1 .. keep-1 of each example: the loss flags summed over [start+1,
        # start+keep) (examples with keep < 2 are left out), and over [start+1, start+length) for what the cut costs
        first, kept_end, full_end = prefix_sums(np.asarray(ex.loss), [starts + 1, starts + np.maximum(keep, 1),
                                                                      starts + np.maximum(lengths, 1)])
        with_loss = kept_end - first
        usable = np.flatnonzero((keep >= 2) & (with_loss > 0))
        truncated = int(np.count_nonzero(lengths[usable] > seq_len + 1))
        all_loss = full_end - first
        dropped = len(ex) - len(usable)
        order = usable if seed is None else usable[np.random.default_rng(seed).permutation(len(usable))]
        if packed:
            ptr, fill = [0], 0
            for n, k in enumerate(order):
                width = int(keep[k]) - 1
                if fill and fill + width > seq_len:
                    ptr.append(n)
                    fill = 0
                fill += width
            if len(order):  # no usable example: no row (not one empty row, whose mean loss is 0/0)
                ptr.append(len(order))
        else:
            ptr = list(range(len(order) + 1))
        total, kept = int(lengths[usable].sum()), int(keep[usable].sum())
        total_loss, kept_loss = int(all_loss[usable].sum()), int(with_loss[usable].sum())
        return cls(ex, order, np.array(ptr, dtype=np.int64), keep, seq_len, packed, pad_id, truncated, dropped,
                   total - kept, total_loss - kept_loss, total, total_loss)

    def __len__(self) -> int:
        return len(self.ptr) - 1

    def row(self, r: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Inputs, targets and positions of row ``r``, padded to ``seq_len``."""
        T = self.seq_len
        x = np.full(T, self.pad_id, dtype=np.int64)
        y = np.full(T, IGNORE, dtype=np.int64)
        pos = np.zeros(T, dtype=np.int64)
        at = 0
        for k in self.order[self.ptr[r]:self.ptr[r + 1]]:
            s, n = int(self.ex.offsets[k]), int(self.keep[k])
            t = np.asarray(self.ex.tokens[s:s + n], dtype=np.int64)
            x[at:at + n - 1] = t[:-1]
            y[at:at + n - 1] = np.where(self.ex.loss[s + 1:s + n] != 0, t[1:], IGNORE)
            pos[at:at + n - 1] = np.arange(n - 1)
            at += n - 1
        pos[at:] = np.arange(T - at)  # the padding: a document of its own, no loss
        return x, y, pos

    def batch(self, rows: list[int]) -> Batch:
        parts = [self.row(r) for r in rows]
        x, y, pos = (torch.from_numpy(np.stack(p)) for p in zip(*parts))
        return Batch(x, y, pos if self.packed else None)

    def report(self) -> str:
        n = int(self.ptr[-1])
        kept = sum(int(self.keep[k]) - 1 for k in self.order)
        fill = kept / max(1, len(self) * self.seq_len)
        what = "packed into" if self.packed else "padded into"
        out = (f"{n} example{'s' if n != 1 else ''} {what} {len(self)} row{'s' if len(self) != 1 else ''} of "
               f"{self.seq_len} tokens ({100 * fill:.0f}% real tokens)")
        if self.truncated:
            out += (f"; {self.truncated} longer than {self.seq_len + 1} tokens cut, losing {self.cut_tokens:,} of "
                    f"{self.total_tokens:,} tokens ({100 * self.cut_tokens / max(1, self.total_tokens):.0f}%) and "
                    f"{self.cut_loss_tokens:,} of {self.total_loss_tokens:,} answer tokens "
                    f"({100 * self.cut_loss_tokens / max(1, self.total_loss_tokens):.0f}%)")
        if self.dropped:
            out += f"; {self.dropped} dropped (no answer token left within data.seq_len)"
        return out


class ExampleSampler:
    """Training batches over ``Rows``, epoch after epoch (module docstring)."""

    def __init__(self, rows: Rows, batch_size: int, seed: int):
        if len(rows) == 0:
            raise DataError("no training example is left (every one was empty or lost its answer to truncation); "
                            "raise data.seq_len or check the data")
        self.rows, self.batch_size, self.seed = rows, batch_size, seed
        self._perm: tuple[int, np.ndarray] | None = None

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.rows)))
        return self._perm[1]

    def batch(self, index: int) -> Batch:
        n, out = len(self.rows), []
        for g in range(index * self.batch_size, (index + 1) * self.batch_size):
            out.append(int(self._epoch_order(g // n)[g % n]))
        return self.rows.batch(out)

    def epochs(self, batches: int) -> float:
        """Epochs done after ``batches`` micro-batches."""
        return batches * self.batch_size / len(self.rows)

    def steps_for(self, epochs: float, per_step: int) -> int:
        """Optimizer steps of ``per_step`` sequences that cover ``epochs`` passes over the rows."""
        return max(1, math.ceil(epochs * self.per_epoch() / per_step))

    def per_epoch(self) -> float:
        """Rows in one pass."""
        return len(self.rows)


class ExampleEvalBatches:
    """The first ``n_batches`` x ``batch_size`` held-out rows, in order, the same at every evaluation."""

    def __init__(self, rows: Rows, batch_size: int, n_batches: int):
        n = min(len(rows), batch_size * n_batches)
        self.batches = [rows.batch(list(range(a, min(n, a + batch_size)))) for a in range(0, n, batch_size)]

    def __iter__(self):
        return iter(self.batches)


# -- on disk ---------------------------------------------------------------------------------------
def write_examples(out_dir: str | Path, data: ExampleData, extra: dict | None = None) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = np.promote_types(data.train.tokens.dtype, data.val.tokens.dtype)  # meta.json records one for both
    for split, ex in (("train", data.train), ("val", data.val)):
        ex.tokens.astype(dtype, copy=False).tofile(out / f"{split}.bin")
        ex.loss.tofile(out / f"{split}.loss.bin")
        ex.offsets.tofile(out / f"{split}.idx.bin")
    meta = {
        "kind": "examples", "dtype": str(dtype),
        "train_examples": len(data.train), "val_examples": len(data.val),
        "train_tokens": int(len(data.train.tokens)), "val_tokens": int(len(data.val.tokens)),
        "vocab_size": data.vocab_size, "eos_id": data.eos_id, "pad_id": data.pad_id, "tokenizer": data.tokenizer,
        "tokenizer_fingerprint": data.fingerprint, "info": data.info,
        "content": content_hash(*(a for ex in (data.train, data.val) for a in (ex.tokens.astype(dtype, copy=False),
                                                                              ex.loss, ex.offsets))),
        **(extra or {}),
    }
    (out / META).write_text(json.dumps(meta, indent=2) + "\n")


def read_examples(path: Path, meta: dict) -> ExampleData:
    """Memory-map a prepared directory of examples; every file's size is checked against ``meta.json``."""
    dtype = np.dtype(meta["dtype"])
    splits = {}
    for split in ("train", "val"):
        n_ex, n_tok = int(meta[f"{split}_examples"]), int(meta[f"{split}_tokens"])
        arrays = []
        for suffix, dt, count in ((".bin", dtype, n_tok), (".loss.bin", np.dtype(np.uint8), n_tok),
                                  (".idx.bin", np.dtype(np.int64), n_ex + 1)):
            f = path / f"{split}{suffix}"
            expect = count * dt.itemsize
            if not f.is_file() or f.stat().st_size != expect:
                raise DataError(f"{f} is missing or truncated (expected {expect} bytes); prepare the data again")
            arrays.append(np.memmap(f, dtype=dt, mode="r") if expect else np.zeros(0, dt))
        ex = Examples(*arrays)
        if len(ex.offsets) and (ex.offsets[0] != 0 or ex.offsets[-1] != n_tok or np.any(np.diff(ex.offsets) < 0)):
            raise DataError(f"{path / (split + '.idx.bin')} is damaged (offsets out of order); prepare the data again")
        splits[split] = ex
    return ExampleData(splits["train"], splits["val"], int(meta["vocab_size"]), int(meta["eos_id"]),
                       int(meta["pad_id"]), meta["tokenizer"], meta.get("tokenizer_fingerprint", ""), meta.get("info", {}))
