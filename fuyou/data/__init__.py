"""Corpora, fine-tuning records, tokenizers, token memmaps and deterministic batch sampling.

Two kinds of data (``load_data``):

- text (the embedded corpus, text files, ``{"text": ...}`` JSON lines): documents joined into one token
  stream, trained on windows of it (``fuyou.data.dataset``), every token with loss;
- fine-tuning examples (prompt/completion, Alpaca, chat ``messages``): one sequence per record with a
  loss mask, packed or padded into rows (``fuyou.data.examples``).
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fuyou.data.config import DataConfig
from fuyou.data.corpus import builtin_documents, iter_documents, iter_records, json_type
from fuyou.data.formats import Renderer, detect
from fuyou.data.tokenizer import ByteTokenizer, compact_ids, load_tokenizer
from fuyou.errors import DataError

if TYPE_CHECKING:
    from fuyou.data.dataset import Batch, BatchSampler, EvalBatches, SyntheticBatches, TokenData
    from fuyou.data.examples import ExampleData

__all__ = [
    "Batch", "BatchSampler", "ByteTokenizer", "DataConfig", "EvalBatches", "ExampleData", "SyntheticBatches",
    "TokenData", "iter_documents", "load_data", "load_tokenizer", "read_data", "tokenize_documents", "tokenize_records",
]

# The token stream and the examples import torch: they are imported when first used, so that building the
# command line's parser (``fuyou --help``: ``fuyou.data.formats``) does not (about a second).
_LAZY = {"Batch": "dataset", "BatchSampler": "dataset", "EvalBatches": "dataset", "SyntheticBatches": "dataset",
         "TokenData": "dataset", "ExampleData": "examples"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"fuyou.data.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'fuyou.data' has no attribute {name!r}")


def _encode(tok, doc: str) -> np.ndarray:
    if hasattr(tok, "encode_np"):  # (byte; a Hugging Face tokenizer: a long document in pieces)
        return tok.encode_np(doc)
    return compact_ids(np.asarray(tok.encode(doc), dtype=np.int64))


def tokenize_documents(docs, tokenizer_spec: str, val_fraction: float) -> TokenData:
    from fuyou.data.dataset import TokenData, split_tokens

    tok = load_tokenizer(tokenizer_spec)
    docs = list(docs)
    train, val = split_tokens([_encode(tok, d) for d in docs], tok.eos_id, tok.vocab_size, val_fraction)
    return TokenData(train, val, tok.vocab_size, tok.eos_id, tok.name, tok.fingerprint, len(docs),
                     val_fraction=val_fraction)


def tokenize_records(paths: list[str], tokenizer_spec: str, fmt: str = "auto", train_on_prompt: bool = False,
                     val_fraction: float = 0.05, text_field: str = "text", eval_paths: list[str] | None = None,
                     note_overlap: bool = True, split: str = "content") -> TokenData | ExampleData:
    """Read and tokenize files: plain documents become a token stream (``TokenData``), fine-tuning
    records become examples with a loss mask (``ExampleData``). The kind is the first record's format
    (or ``fmt``); every file must hold the same kind. ``eval_paths``: held-out files, else
    ``val_fraction`` of the documents' tokens (the tail of a seeded shuffle of them) or of the examples
    (``held_out``: by their content; ``split="shuffle"``: a seeded shuffle of them, as runs started before
    2026-12-05 chose them, for their resumes); ``note_overlap``: say so when those are (in) the training files."""
    from fuyou.data.dataset import TokenData, join_tokens, split_tokens, token_dtype
    from fuyou.data.examples import ExampleData, Examples

    noted = bool(eval_paths and note_overlap and _note_overlap(paths, eval_paths))
    same_files = bool(eval_paths) and list(map(str, eval_paths)) == list(map(str, paths))
    tok = load_tokenizer(tokenizer_spec)
    records = iter_records(paths, text_field, held=same_files)  # streamed: never all held as Python objects
    head = next(records, None)
    if head is None:
        raise DataError(f"{', '.join(map(str, paths))} holds no records")
    records = itertools.chain([head], records)
    first = fmt if fmt != "auto" else detect(head[0], text_field, head[1])
    if fmt == "auto" and first != "text" and text_field in head[0]:  # (chosen in silence: a pass)
        print(f"fuyou: note: the first record ({head[1]}) is {first} data and has a {text_field!r} field too: the "
              f"records are read as {first}, their {text_field!r} unused (--format text, data.format=text, reads "
              f"that instead)", file=sys.stderr)
    renderer = Renderer(tok, fmt, train_on_prompt, text_field)
    if first == "text":
        first_where = head[1] if fmt == "auto" else None
        docs, empties = [], []
        for rec, where in records:
            docs.append(_encode(tok, _text(rec, where, text_field, first_where)))
            if not len(docs[-1]) and len(empties) < 3:
                empties.append(where)
        if not any(len(d) for d in docs):  # (an empty file was "1 document" of one token, refused only by training)
            raise DataError(f"{', '.join(map(str, paths))} holds no text (empty documents only)")
        empty = sum(not len(d) for d in docs)
        if empty:  # (each is an end-of-document token alone in the stream: a pass saw the counts and wondered;
            # which they are was left to find: a note of session 17)
            more = ", ..." if empty > len(empties) else ""
            print(f"fuyou: note: {empty} of the {len(docs)} documents are empty ({', '.join(empties)}{more}): each "
                  f"adds an end-of-document token alone", file=sys.stderr)
        if not eval_paths:
            train, val = split_tokens(docs, tok.eos_id, tok.vocab_size, val_fraction)
            return TokenData(train, val, tok.vocab_size, tok.eos_id, tok.name, tok.fingerprint, len(docs),
                             val_fraction=val_fraction)
        held = [_encode(tok, _text(rec, where, text_field, first_where))
                for rec, where in iter_records(eval_paths, text_field, held=True)]
        if not any(len(d) for d in held):  # (prepared as "1 val token", evaluation then off, in silence: a pass)
            raise DataError(f"{', '.join(map(str, eval_paths))} holds no text to evaluate on; check the file "
                            f"(--eval, data.eval_path)")
        if not noted and not same_files:
            _note_shared_documents(held, docs, eval_paths)
        train, val = join_tokens(docs, tok.eos_id, tok.vocab_size), join_tokens(held, tok.eos_id, tok.vocab_size)
        dtype = np.promote_types(train.dtype, val.dtype)  # (ids beyond the tokenizer's vocabulary: the wider)
        return TokenData(train.astype(dtype), val.astype(dtype), tok.vocab_size, tok.eos_id, tok.name, tok.fingerprint,
                         len(docs) + len(held), len(held))
    rendered = _render_all(renderer, records, first, head[1], text_field)
    train_records = renderer.stats.records
    if same_files:
        held = list(rendered)  # the same files (held-out files of prepared data): rendered once, counted once
    elif eval_paths:
        held = _render_all(renderer, iter_records(eval_paths, text_field, held=True), first, head[1], text_field)
        if not held:  # (prepared as "0 held-out examples", evaluation then off, in silence: a pass)
            raise DataError(f"{', '.join(map(str, eval_paths))} holds no example to evaluate on (no record, or none "
                            f"with a token to learn); check the file (--eval, data.eval_path)")
    elif split == "shuffle":  # (fuyou before 2026-12-05: kept for the resumes of runs it started)
        order = np.random.default_rng(1234).permutation(len(rendered))
        n_val = max(1, int(round(len(rendered) * val_fraction))) if len(rendered) > 1 and val_fraction else 0
        held = [rendered[i] for i in sorted(order[:n_val])]
        rendered = [rendered[i] for i in sorted(order[n_val:])]
    else:
        out = held_out(rendered, val_fraction)
        held = [r for r, o in zip(rendered, out) if o]
        rendered = [r for r, o in zip(rendered, out) if not o]
        n = len(held) + len(rendered)
        if held and len(held) / n > max(2 * val_fraction, 0.15):  # (half of two examples, in silence: a pass)
            print(f"fuyou: note: {len(held)} of the {n} examples {'is' if len(held) == 1 else 'are'} held out for "
                  f"evaluation ({len(held) / n:.0%}; data.val_fraction={val_fraction:g} of so few) and not trained "
                  f"on; data.val_fraction=0 (--val-fraction 0) trains on every one, without evaluation, or give "
                  f"held-out examples as data.eval_path (--eval)", file=sys.stderr)
    st = renderer.stats
    if st.fallback_chats and tok.name != "byte":
        print(f"fuyou: note: the tokenizer {tok.name} has no chat template: {st.fallback_chats} conversations were "
              f"rendered with fuyou's ChatML-style fallback (<|im_start|>ROLE ... <|im_end|>, each assistant turn "
              f"followed by the EOS token, which the model learns as its stop); prompt the fine-tuned model the same "
              f"way"
              + (" (`fuyou export` writes it as the model's chat template)" if renderer.fallback_template else "")
              + ", or give a tokenizer that has a chat template", file=sys.stderr)
    for note in st.notes():
        print(f"fuyou: note: {note}", file=sys.stderr)
    if not rendered:
        raise DataError(f"{', '.join(map(str, paths))} holds no usable example: " + "; ".join(st.notes()))
    info = {"records": st.records, "held_records": st.records - train_records if eval_paths else 0,
            "formats": st.formats, "last_turn_only": st.last_turn_only,
            "train_on_prompt": train_on_prompt, "skipped_no_answer": st.no_answer,
            "val_fraction": None if eval_paths else val_fraction}
    if st.fallback_chats and renderer.fallback_template:  # (what an export writes as the model's chat template)
        info["chat_template"] = renderer.fallback_template
    top = max((int(ids.max()) for ids, _ in itertools.chain(rendered, held) if len(ids)), default=0)
    dtype = token_dtype(tok.vocab_size, top)  # one type for both splits (meta.json records one)
    data = ExampleData(Examples.from_arrays(rendered, dtype), Examples.from_arrays(held, dtype), tok.vocab_size,
                       tok.eos_id, tok.pad_id, tok.name, tok.fingerprint, info)
    if eval_paths and not noted and not same_files:
        note_shared_examples(data.val, data.train, eval_paths)
    return data


def held_out(examples: list[tuple[np.ndarray, np.ndarray]], fraction: float) -> list[bool]:
    """Which examples ``data.val_fraction`` holds out: each by its tokens alone, held out when a hash of them
    falls in the lowest ``fraction`` of its range. Adding or removing other records moves no example between
    the splits (a seeded shuffle of them all redrew the split, and a resume over grown data evaluated on
    examples it had trained on), and repeated examples fall on one side. About ``fraction`` of them, and at
    least one held out and one trained on when there are two different ones: where none falls under the
    fraction (a few examples), the lowest (with its repeats) is held out, which examples added later may
    change."""
    import hashlib

    if not fraction or len(examples) < 2:
        return [False] * len(examples)
    keys = [int.from_bytes(hashlib.blake2b(ids.astype(np.int64).tobytes(), digest_size=8).digest(), "little")
            for ids, _ in examples]
    out = [k < fraction * 2**64 for k in keys]
    if not any(out):  # (by key: an example's repeats go with it)
        low = min(keys)
        out = [k == low for k in keys]
    if all(out):
        high = max(keys)
        out = [k != high for k in keys]
    return out


def note_shared_examples(held, train, eval_paths) -> None:
    """Held-out examples that are training examples too, by content (``Examples.shared_with``)."""
    n = held.shared_with(train)
    if n:
        print(f"fuyou: note: {n} of the {len(held)} held-out examples in {', '.join(map(str, eval_paths))} are also "
              f"training examples: their loss measures what the model memorised, not how it generalises; give "
              f"held-out examples of their own", file=sys.stderr)


def _note_shared_documents(held: list[np.ndarray], docs: list[np.ndarray], eval_paths) -> None:
    """Held-out documents that are training documents too, token for token (a copy of a training file)."""
    import hashlib

    def key(d: np.ndarray) -> bytes:
        return hashlib.blake2b(d.astype(np.int64).tobytes(), digest_size=16).digest()

    train = {key(d) for d in docs}
    n = sum(key(h) in train for h in held)
    if n:
        print(f"fuyou: note: {n} of the {len(held)} held-out documents in {', '.join(map(str, eval_paths))} are also "
              f"training documents: their loss measures what the model memorised, not how it generalises; give "
              f"held-out text of its own", file=sys.stderr)


def _note_overlap(paths, eval_paths) -> bool:
    """Held-out files that are, or lie in, the training files: the held-out loss then measures memorisation
    (a new-user pass gave the training file as its own eval file, and a file of the training directory as
    --eval, in silence)."""
    train = [Path(p).resolve() for p in paths]
    both = [str(e) for e in eval_paths if any(Path(e).resolve() == t or t in Path(e).resolve().parents or
                                              Path(e).resolve() in t.parents for t in train)]
    if both:
        print(f"fuyou: note: the held-out data {', '.join(both)} is (in) the training data "
              f"{', '.join(map(str, paths))}: its loss measures what the model memorised, not how it generalises; "
              f"give held-out files of their own, or leave them out to hold out a share of the data", file=sys.stderr)
    return bool(both)


def _render_all(renderer: Renderer, records, first: str, first_where: str,
                text_field: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """Every record rendered; a conversation with nothing to learn is left out (``renderer.stats`` counts it).
    Plain text among fine-tuning records is refused: it would be one example with loss on every token and no
    end-of-document token."""
    out = []
    for rec, where in records:
        if renderer.fmt == "auto" and detect(rec, text_field, where) == "text":
            raise DataError(f"{where} is plain text, but the first record ({first_where}) is {first} data; a run "
                            f"trains one kind: fine-tuning records, or text. Give the text files as a run of their own")
        r = renderer(rec, where)
        if r is not None:
            out.append(r.arrays())
    return out


def _text(rec: dict, where: str, field: str, first_where: str | None) -> str:
    """A text record's document (``first_where``: the record that made the data text, or None: data.format=text)."""
    if not isinstance(rec.get(field), str):
        if first_where is None:
            raise DataError(f"{where}: expected an object with a string field {field!r} (data.format=text, --format "
                            f"text); its keys are {sorted(rec)[:6]}: leave the format to be detected, or name the "
                            f"field with data.jsonl_field (--jsonl-field)")
        got = json_type(rec.get(field)) if field in rec else "missing"
        if where == first_where:  # (it said "the first record (this one) is plain text, so every record must be")
            raise DataError(f"{where}: the field {field!r} is {got}, not a string: a text record is "
                            f"{{{field!r}: \"...\"}}")
        raise DataError(f"{where}: expected an object with a string field {field!r} (it is {got}): the first record "
                        f"({first_where}) is plain text, so every record must be (a run trains one kind of data; "
                        f"data.format names one format for all files)")
    return rec[field]


def read_data(path: str | Path) -> TokenData | ExampleData:
    """A directory made by ``fuyou data prepare``: a token stream or examples, by its ``meta.json``."""
    from fuyou.data.dataset import META, read_prepared
    from fuyou.data.examples import read_examples

    p = Path(path)
    if not (p / META).is_file():
        raise DataError(f"{p} is not a prepared data directory (no {META}); create one with `fuyou data prepare`")
    try:
        meta = json.loads((p / META).read_text())
        bad = _meta_problem(meta)
        if bad:  # (an edited field reached the code as an AttributeError, or a run's config.toml: a pass)
            raise ValueError(bad)
        if meta.get("kind") == "examples":
            return read_examples(p, meta)
    except (KeyError, ValueError, TypeError) as e:
        raise DataError(f"{p / META} is malformed ({e}); prepare the data again") from e
    return read_prepared(p)


_META_INTS = ("train_tokens", "val_tokens", "vocab_size", "eos_id", "train_examples", "val_examples", "held_documents")


def _meta_problem(meta) -> str | None:
    """What is wrong with the types of a prepared directory's ``meta.json`` fields (None: nothing)."""
    if not isinstance(meta, dict):
        return f"a JSON {type(meta).__name__}, not an object"
    for k in _META_INTS:
        v = meta.get(k, 0)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            return f"{k} is {v!r}, not a count"
    for k, kind in (("dtype", str), ("tokenizer", str), ("info", dict), ("kind", str)):
        if k in meta and not isinstance(meta[k], kind):
            return f"{k} is {meta[k]!r}, not a {'string' if kind is str else 'JSON object'}"
    for k, kind in (("tokenizer_fingerprint", str), ("pad_id", int)):
        if meta.get(k) is not None and not isinstance(meta[k], kind):
            return f"{k} is {meta[k]!r}"
    for frac in (meta.get("val_fraction"), (meta.get("info") or {}).get("val_fraction")):
        if frac is not None and (not isinstance(frac, (int, float)) or isinstance(frac, bool) or not 0 <= frac < 1):
            return f"val_fraction is {frac!r}, not a share from 0 to below 1"
    return None


def load_data(cfg: DataConfig, tokenizer: str | None = None, check_prepared: bool = True,
              split: str = "content", model_tokenizer: str | None = None) -> TokenData | ExampleData | None:
    """Tokens or examples for ``cfg`` (None for synthetic data, which needs no tokens). ``tokenizer``:
    the resolved ``data.tokenizer`` (``resolve_tokenizer``). ``check_prepared``: refuse settings prepared
    data fixed (``_check_prepared_settings``; a resume keeps the run's own config, whatever it says).
    ``model_tokenizer``: the tokenizer of ``model.init_from``, which may tokenize prepared data's
    ``data.eval_path`` where it has the data's vocabulary (``_eval_tokenizer``)."""
    if cfg.source == "synthetic":
        return None
    from fuyou.data.examples import ExampleData

    spec = tokenizer or (cfg.tokenizer if cfg.tokenizer != "auto" else "byte")
    if cfg.source == "prepared":
        data = read_data(cfg.path[0])
        if check_prepared:
            _check_prepared_settings(cfg, data)
            prepared = data.info.get("val_fraction") if isinstance(data, ExampleData) else data.val_fraction
            if prepared is not None and "val_fraction" not in cfg.model_fields_set:  # the run's config says what acts
                object.__setattr__(cfg, "val_fraction", prepared)
        if cfg.eval_path:  # held-out files, tokenized with the tokenizer the data was prepared with
            eval_spec = _eval_tokenizer(data, tokenizer, cfg.tokenizer, model=model_tokenizer)
            held = tokenize_records(cfg.eval_path, eval_spec, cfg.format,
                                    _prepared_on_prompt(data), 0.5,
                                    cfg.jsonl_field, eval_paths=cfg.eval_path, note_overlap=False)
            if isinstance(held, ExampleData) != isinstance(data, ExampleData):
                raise DataError("data.eval_path holds another kind of data (text vs. fine-tuning records) than "
                                "data.path")
            if len(data.val):
                print(f"fuyou: note: data.eval_path replaces the held-out split prepared in {cfg.path[0]} "
                      f"({len(data.val)} {'examples' if isinstance(data, ExampleData) else 'tokens'}), which is not "
                      f"trained on either", file=sys.stderr)
            data.val = held.val
            if isinstance(data, ExampleData):  # (the training examples are prepared: their files are unknown)
                note_shared_examples(data.val, data.train, cfg.eval_path)
        if isinstance(data, ExampleData):
            print(f"fuyou: data: {data.summary()}", file=sys.stderr)
        return data
    if cfg.source == "builtin":
        return tokenize_documents(builtin_documents(), spec, cfg.val_fraction)
    data = tokenize_records(cfg.path, spec, cfg.format, bool(cfg.train_on_prompt), cfg.val_fraction, cfg.jsonl_field,
                            cfg.eval_path or None, split=split)
    if isinstance(data, ExampleData):
        print(f"fuyou: data: {data.summary()}", file=sys.stderr)
    return data


def _check_prepared_settings(cfg: DataConfig, data) -> None:
    """Settings that ``fuyou data prepare`` fixed when it made the data would be ignored when training on it:
    refused, with how to get them (a run's config.toml would otherwise record what did not happen)."""
    from fuyou.data.examples import ExampleData

    fields = DataConfig.model_fields
    ignored = []
    if cfg.format != "auto" and not cfg.eval_path:  # (the option in brackets, as the error says: a pass)
        ignored.append(f"data.format={cfg.format} (--format)")
    if cfg.jsonl_field != fields["jsonl_field"].default and not cfg.eval_path:
        ignored.append(f"data.jsonl_field={cfg.jsonl_field} (--jsonl-field)")
    prepared = (data.info.get("val_fraction") if isinstance(data, ExampleData) else data.val_fraction)
    if prepared is not None:  # (recorded since 2026-12-05: the share it held out)
        if "val_fraction" in cfg.model_fields_set and cfg.val_fraction != prepared:
            ignored.append(f"data.val_fraction={cfg.val_fraction:g} (prepared with {prepared:g}; --val-fraction)")
    elif cfg.val_fraction != fields["val_fraction"].default:
        ignored.append(f"data.val_fraction={cfg.val_fraction:g} (--val-fraction)")
    prepared_on_prompt = _prepared_on_prompt(data)
    if cfg.train_on_prompt is not None and cfg.train_on_prompt != prepared_on_prompt:
        ignored.append(f"data.train_on_prompt={str(cfg.train_on_prompt).lower()} (prepared with "
                       f"{str(prepared_on_prompt).lower()}; --train-on-prompt)")
    if cfg.tokenizer != "auto":
        given = "byte" if cfg.tokenizer == "byte" else f"hf:{Path(cfg.tokenizer).resolve()}"
        if given != data.tokenizer and not _same_vocabulary(cfg.tokenizer, data.fingerprint):
            ignored.append(f"data.tokenizer={cfg.tokenizer} (prepared with {data.tokenizer}; --tokenizer)")
    if ignored:
        raise DataError(f"data.path {cfg.path[0]} is prepared data: `fuyou data prepare` fixed these settings when it "
                        f"made it, so training would ignore {', '.join(ignored)}. Prepare the data again with what "
                        f"you want (the option in brackets), or leave them out")


def _prepared_on_prompt(data) -> bool:
    """``--train-on-prompt`` as ``fuyou data prepare`` was given it (text data: false)."""
    from fuyou.data.examples import ExampleData

    return bool(data.info.get("train_on_prompt", False)) if isinstance(data, ExampleData) else False


def _same_vocabulary(spec: str, fingerprint: str) -> bool:
    """Whether tokenizer ``spec`` (a copy elsewhere, say) has the vocabulary the data was prepared with."""
    try:
        return bool(fingerprint) and load_tokenizer(spec).fingerprint == fingerprint
    except DataError:
        return False


def _eval_tokenizer(data, *given: str | None, model: str | None = None) -> str:
    """The tokenizer for prepared data's held-out files: the one it was prepared with, or a given one with its
    vocabulary (a copy elsewhere: the data and the model moved to another machine, say); ``model``'s (the
    --init-from tokenizer), with its vocabulary, only where the data's own is gone (the vocabulary is compared, not
    the chat template or end of turn: a review)."""
    tried = [spec for spec in given if spec and spec not in ("auto", "byte")]
    for spec in tried:
        if _same_vocabulary(spec, data.fingerprint):
            return spec
    spec = _spec_of(data)
    if spec != "byte" and not Path(spec).is_dir() and model and _same_vocabulary(model, data.fingerprint):
        return model
    tried += [model] if model else []
    if spec != "byte" and not Path(spec).is_dir():
        other = (f" ({', '.join(dict.fromkeys(tried))} has another vocabulary)" if tried else "")
        raise DataError(f"data.eval_path is tokenized with the tokenizer the data was prepared with, {spec}, which is "
                        f"gone{other}: give data.tokenizer=DIR, a copy of it (or model.init_from a model that has it)")
    return spec


def _spec_of(data) -> str:
    return data.tokenizer.removeprefix("hf:") if data.tokenizer.startswith("hf:") else data.tokenizer
