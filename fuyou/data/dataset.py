"""Token arrays, the ``.bin`` memmap format, and deterministic batch sampling.

A prepared data directory holds ``train.bin`` and ``val.bin`` (raw little-endian uint16 or uint32
token ids) and ``meta.json`` (dtype, counts, tokenizer). Batches are drawn by index: batch ``i``
depends only on (seed, i), so the data position of a run is just its micro-batch counter, which makes
resuming exact and costs no state.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from fuyou.errors import DataError

META = "meta.json"
IGNORE = -100  # a target that carries no loss (F.cross_entropy's ignore_index)


class Batch(NamedTuple):
    """One micro-batch: ``tokens`` and ``targets`` (B, T), a target of ``IGNORE`` carrying no loss;
    ``positions`` (B, T): each token's position in its document, 0 where a packed document starts
    (None: one document per row, causal attention needs no mask)."""

    tokens: Tensor
    targets: Tensor
    positions: Tensor | None = None

    @property
    def loss_tokens(self) -> int:
        """Tokens with a target (the loss is a mean over these)."""
        return int((self.targets != IGNORE).sum())


@dataclass
class TokenData:
    """Train and held-out token streams (documents joined with the end-of-document token)."""

    train: np.ndarray
    val: np.ndarray
    vocab_size: int
    eos_id: int
    tokenizer: str
    fingerprint: str = ""  # names the tokenizer's vocabulary (``fuyou.data.tokenizer``)
    documents: int = 0     # how many documents were joined (0: not known, e.g. read from a prepared directory)
    held_documents: int = 0  # of which from held-out files (--eval); 0 where a share of the data is held out
    val_fraction: float | None = None  # the share held out (None: held-out files, or not recorded)

    def check_fits(self, seq_len: int, model_vocab: int) -> None:
        for name, arr in (("train", self.train), ("val", self.val)):
            top = int(arr.max()) if len(arr) else 0
            if top >= model_vocab:
                raise DataError(beyond_vocab(name, top, model_vocab, self.vocab_size, self.tokenizer))
            if name == "train" and len(arr) < seq_len + 1:  # (a held-out split that small turns evaluation off)
                raise DataError(
                    f"the train split has {len(arr)} tokens, fewer than one sequence of {seq_len}+1; "
                    f"use more text or a smaller data.seq_len"
                )
        if self.eos_id >= model_vocab:
            raise DataError(beyond_vocab("end-of-document token", self.eos_id, model_vocab, self.vocab_size,
                                         self.tokenizer))


def beyond_vocab(what: str, top: int, model_vocab: int, tok_vocab: int, tokenizer: str) -> str:
    """Why token id ``top`` of ``what`` has no embedding, and what to do: a tokenizer larger than the model
    (tokens added to it) is not refused while its data fits (a new-user pass was told to raise
    model.vocab_size, which a pretrained model's shape overrides)."""
    holds = f"the {what} is token id {top}" if "token" in what else f"the {what} split holds token id {top}"
    if tok_vocab > model_vocab:
        return (f"{holds}, beyond the model's vocabulary of {model_vocab} (model.vocab_size); the tokenizer "
                f"{tokenizer} has {tok_vocab} tokens, tokens the model has no embedding for. From scratch: set "
                f"model.vocab_size >= {tok_vocab}. A pretrained model (--init-from): use its own tokenizer, or "
                f"give it room first (transformers' resize_token_embeddings, then save_pretrained)")
    return (f"{holds}, beyond the model's vocabulary of {model_vocab}: the data was prepared with another "
            f"tokenizer ({tokenizer}) or is damaged; prepare it with this model's tokenizer")


def token_dtype(vocab_size: int, top: int = 0) -> np.dtype:
    """The stored type of token ids, one for every split of a dataset: 16 bits while the vocabulary (and the
    largest id, ``top``) fits, else 32. (Chosen by each split's own largest id, a held-out file with an id
    above 65535 beside a training split below it was stored in 16 bits, its ids wrapped in silence.)"""
    return np.dtype(np.uint16 if max(vocab_size - 1, top) < 2**16 else np.uint32)


def join_tokens(docs: list[np.ndarray], eos_id: int, vocab_size: int, seed: int = 1234) -> np.ndarray:
    """Documents (in a fixed shuffled order) each followed by EOS, as one stream (``token_dtype``), written
    into one array of that type (no int64 copies of the stream: ``compact_ids``)."""
    order = np.random.default_rng(seed).permutation(len(docs))
    top = max([eos_id, *(int(d.max(initial=0)) for d in docs)])
    out = np.empty(sum(len(d) for d in docs) + max(1, len(docs)), dtype=token_dtype(vocab_size, top))
    pos = 0
    for i in order:
        d = docs[i]
        out[pos:pos + len(d)] = d
        pos += len(d)
        out[pos] = eos_id
        pos += 1
    if not docs:
        out[0] = eos_id
    return out


def split_tokens(docs: list[np.ndarray], eos_id: int, vocab_size: int, val_fraction: float,
                 seed: int = 1234) -> tuple[np.ndarray, np.ndarray]:
    """Join documents (``join_tokens``); the last ``val_fraction`` is held out."""
    joined = join_tokens(docs, eos_id, vocab_size, seed)
    n_val = int(len(joined) * val_fraction)
    return joined[: len(joined) - n_val], joined[len(joined) - n_val :]


PREPARED_FILES = ("train.bin", "val.bin", "train.loss.bin", "train.idx.bin", "val.loss.bin", "val.idx.bin", META)


def replace_prepared(out_dir: str | Path, write) -> None:
    """``write(directory)`` into a new directory beside ``out_dir``, then put it in ``out_dir``'s place. The files
    were overwritten in place, one after another: a Ctrl-C between two left new tokens with old loss masks and
    offsets that trained without a word, a full disk destroyed the previous data, and a run reading the old files
    died of SIGBUS (a pass). Now ``out_dir`` holds the old data or the new, whole; a run that has the old mapped
    keeps reading it. The swap is two renames with SIGINT/SIGTERM deferred across them (``_signals_deferred``),
    and a kill between them is undone by the next call (the old directory is put back). ``out_dir`` is followed
    if it is a link, and its permissions and group are the new directory's from the start. Where it cannot be
    renamed (a mount point, the current directory), its parent cannot be written, or it holds other files than
    prepared data (kept: a swap deleted them, a pass), the new files are written inside it and renamed over the
    old ones, ``meta.json`` last, signals deferred across the renames."""
    import os
    import secrets
    import shutil

    out = Path(os.path.realpath(out_dir))  # (a link to a directory: its target, not the link, is replaced)
    base = out.parent
    if out.is_dir():
        sweep_leftovers(out, out.name)
    inside = out.is_dir() and (os.path.ismount(out) or out == Path.cwd().resolve()
                               or not os.access(out.parent, os.W_OK | os.X_OK)
                               or any(p.name not in PREPARED_FILES for p in out.iterdir()))
    if inside:
        base = out
    base.mkdir(parents=True, exist_ok=True)
    sweep_leftovers(base, out.name)
    tag = f"{os.getpid()}-{secrets.token_hex(4)}"
    tmp = base / f".{out.name}.prepare-{tag}"
    tmp.mkdir()  # (as a plain mkdir makes it, with the umask's permissions: mkdtemp's are 0700)
    try:
        if out.exists() and not inside:  # before the files: they inherit a setgid directory's group (a pass)
            st = out.stat()
            try:
                os.chown(tmp, -1, st.st_gid)
            except OSError:
                pass
            os.chmod(tmp, st.st_mode & 0o7777)
        write(tmp)
        for f in tmp.iterdir():  # on the disk before they take the old data's place
            with f.open("rb") as fh:
                os.fsync(fh.fileno())
        if inside:
            new = sorted(f.name for f in tmp.iterdir())
            with _signals_deferred():
                for name in sorted(new, key=lambda n: n == META):
                    os.replace(tmp / name, out / name)
                for name in PREPARED_FILES:
                    if name not in new:
                        (out / name).unlink(missing_ok=True)
            tmp.rmdir()
        else:
            old = base / f".{out.name}.old-{tag}" if out.exists() else None
            with _signals_deferred():
                if old is not None:
                    os.rename(out, old)
                os.rename(tmp, out)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        fd = os.open(base, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class _signals_deferred:
    """SIGINT and SIGTERM that arrive inside are handled once it ends (in the main thread: elsewhere nothing is
    changed). Blocking them in the main thread did not hold them off: another thread took them (a pass)."""

    SIGNALS = ("SIGINT", "SIGTERM")

    def __enter__(self):
        import signal
        import threading

        self.got, self.old = [], {}
        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                sig = getattr(signal, name)
                self.old[sig] = signal.signal(sig, lambda s, f: self.got.append(s))
        return self

    def __exit__(self, *exc):
        import os
        import signal

        for sig, handler in self.old.items():
            signal.signal(sig, handler)
        for sig in dict.fromkeys(self.got):
            os.kill(os.getpid(), sig)  # (now to the handler it had: Ctrl-C's KeyboardInterrupt, SIGTERM's end)
        return False


def sweep_leftovers(base: Path, name: str, quiet_s: float = 600.0) -> None:
    """What a killed ``replace_prepared`` left (its pid in the name, no longer running, and nothing in it written
    for ``quiet_s``: a pid from another container's namespace is not ours to judge, a pass): a new directory not
    yet in place is removed; an old one whose place is empty (killed between the two renames) is put back."""
    import os
    import shutil
    import time

    from fuyou.data.config import leftover_kind

    for d in sorted(Path(base).iterdir()) if Path(base).is_dir() else []:
        kind = leftover_kind(d, name)
        if kind is None:
            continue
        try:
            latest = max([d.stat().st_mtime] + [f.stat().st_mtime for f in d.iterdir()])
        except OSError:
            continue
        if kind == "old" and not (Path(base) / name).exists():
            os.rename(d, Path(base) / name)  # (the data, put back: whenever it was moved aside)
        elif time.time() - latest >= quiet_s:
            shutil.rmtree(d, ignore_errors=True)


def content_hash(*arrays) -> str:
    """A hash of every byte of ``arrays`` (a prepared directory's tokens, masks and offsets), kept in its
    meta.json: a resume compares prepared data by it (an edit that kept the size went unseen by samples)."""
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(str(a.dtype).encode() + str(len(a)).encode())
        h.update(memoryview(a).cast("B") if a.size else b"")
    return "blake2b:" + h.hexdigest()


def write_prepared(out_dir: str | Path, data: TokenData, extra: dict | None = None) -> None:
    """The token streams and meta.json (with ``extra``'s fields: the held-out files given, ``fuyou data prepare``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("train.loss.bin", "train.idx.bin", "val.loss.bin", "val.idx.bin"):  # examples prepared there before
        (out / stale).unlink(missing_ok=True)
    dtype = np.promote_types(data.train.dtype, data.val.dtype)  # meta.json records one for both
    data.train.astype(dtype, copy=False).tofile(out / "train.bin")
    data.val.astype(dtype, copy=False).tofile(out / "val.bin")
    meta = {
        "dtype": str(dtype), "train_tokens": int(len(data.train)), "val_tokens": int(len(data.val)),
        "vocab_size": data.vocab_size, "eos_id": data.eos_id, "tokenizer": data.tokenizer,
        "tokenizer_fingerprint": data.fingerprint, "val_fraction": data.val_fraction,
        "held_documents": data.held_documents,  # (from --eval files; a resume compares it: train.loop)
        "content": content_hash(data.train.astype(dtype, copy=False), data.val.astype(dtype, copy=False)),
        **(extra or {}),
    }
    (out / META).write_text(json.dumps(meta, indent=2) + "\n")


def read_prepared(path: str | Path) -> TokenData:
    """Memory-map a prepared directory; sizes are checked against ``meta.json``."""
    p = Path(path)
    if not (p / META).is_file():
        raise DataError(f"{p} is not a prepared data directory (no {META}); create one with `fuyou data prepare`")
    try:
        meta = json.loads((p / META).read_text())
        dtype = np.dtype(meta["dtype"])
        arrays = {}
        for split in ("train", "val"):
            f = p / f"{split}.bin"
            expect = int(meta[f"{split}_tokens"]) * dtype.itemsize
            if not f.is_file() or f.stat().st_size != expect:
                raise DataError(
                    f"{f} is missing or truncated (expected {expect} bytes); prepare the data again"
                )
            arrays[split] = np.memmap(f, dtype=dtype, mode="r") if expect else np.zeros(0, dtype)
        return TokenData(arrays["train"], arrays["val"], int(meta["vocab_size"]), int(meta["eos_id"]), meta["tokenizer"],
                         meta.get("tokenizer_fingerprint", ""), val_fraction=meta.get("val_fraction"))
    except (KeyError, ValueError, TypeError) as e:
        raise DataError(f"{p / META} is malformed ({e!r}); prepare the data again") from e


class BatchSampler:
    """Random windows of ``seq_len + 1`` tokens; batch ``i`` is a pure function of (seed, i)."""

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int):
        self.tokens, self.seq_len, self.batch_size, self.seed = tokens, seq_len, batch_size, seed

    def batch(self, index: int) -> Batch:
        gen = torch.Generator().manual_seed(self.seed * 7_919 + index)
        hi = len(self.tokens) - self.seq_len - 1
        starts = torch.randint(0, hi + 1, (self.batch_size,), generator=gen).tolist()
        return _windows(self.tokens, starts, self.seq_len)

    def epochs(self, batches: int) -> float:
        """Passes over the training tokens that ``batches`` micro-batches make (windows are drawn at
        random: this counts tokens, not coverage)."""
        return batches * self.batch_size * self.seq_len / max(1, len(self.tokens))

    def steps_for(self, epochs: float, per_step: int) -> int:
        """Optimizer steps of ``per_step`` windows that draw ``epochs`` times the training tokens."""
        return max(1, math.ceil(epochs * self.per_epoch() / per_step))

    def per_epoch(self) -> float:
        """Windows in one pass over the training tokens."""
        return len(self.tokens) / self.seq_len


class EvalBatches:
    """A fixed set of evenly spaced held-out windows, the same at every evaluation."""

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, n_batches: int):
        hi = len(tokens) - seq_len - 1
        n = batch_size * n_batches
        starts = np.linspace(0, hi, num=n).astype(np.int64).tolist()
        self.batches = [
            _windows(tokens, starts[i : i + batch_size], seq_len) for i in range(0, n, batch_size)
        ]

    def __iter__(self):
        return iter(self.batches)


class SyntheticBatches:
    """Uniform random tokens, for benchmarks: same interface as ``BatchSampler``, no data needed."""

    def __init__(self, vocab_size: int, seq_len: int, batch_size: int, seed: int):
        self.vocab_size, self.seq_len, self.batch_size, self.seed = vocab_size, seq_len, batch_size, seed

    def batch(self, index: int) -> Batch:
        gen = torch.Generator().manual_seed(self.seed * 7_919 + index)
        t = torch.randint(0, self.vocab_size, (self.batch_size, self.seq_len + 1), generator=gen)
        return Batch(t[:, :-1].contiguous(), t[:, 1:].contiguous())

    def epochs(self, batches: int) -> None:
        return None


def _windows(tokens: np.ndarray, starts: list[int], seq_len: int) -> Batch:
    rows = np.stack([np.asarray(tokens[s : s + seq_len + 1], dtype=np.int64) for s in starts])
    t = torch.from_numpy(rows)
    return Batch(t[:, :-1].contiguous(), t[:, 1:].contiguous())


SAMPLED = (64, 4096)  # ``content_fingerprint`` reads this many runs of this many elements of each array


def content_fingerprint(data) -> int:
    """A 60-bit fingerprint of the training data (``TokenData``, ``ExampleData`` or None for synthetic):
    each split's arrays' sizes and contents at ``SAMPLED`` evenly spaced places (contiguous runs: prepared
    data is memory-mapped, and a read touches whole pages, so a few MB of any size). Data-parallel ranks
    compare it: each machine reads its own ``data.path``, and ranks given different files trained each on
    its own in silence."""
    import zlib

    if data is None:
        return 0
    arrays = []
    for split in (data.train, data.val):
        arrays += [split] if isinstance(split, np.ndarray) else [split.tokens, split.loss, split.offsets]
    crc, size = 0, 0
    runs, run = SAMPLED
    for a in arrays:
        crc = zlib.crc32(str((len(a), a.dtype.str)).encode(), crc)
        starts = np.unique(np.linspace(0, max(0, len(a) - run), runs).astype(np.int64)) if len(a) else []
        for s0 in starts:
            crc = zlib.crc32(np.ascontiguousarray(a[s0:s0 + run]).tobytes(), crc)
        size = (size * 1_000_003 + len(a)) % (1 << 28)
    return (size << 32 | crc) & ((1 << 60) - 1)
