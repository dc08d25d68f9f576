"""Text sources: the embedded default corpus and user files (text, directories, JSON lines).

The embedded corpus is the Python standard library's ``pydoc_data.topics``: about 460 KB of real
English technical prose (the language reference's topics) that ships with every CPython, so the
default run needs no download.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path

from fuyou.data.config import JSONL_SUFFIXES, is_prepared
from fuyou.errors import DataError, encoding_advice

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text"}
_TABLE = ("convert it to JSON Lines, one example an object: pandas.read_{}(FILE).to_json(OUT, orient='records', "
          "lines=True)")
BINARY_SUFFIXES = {  # refused by name, not trained on as text; what to do instead
    ".parquet": _TABLE.format("parquet"), ".arrow": _TABLE.format("feather"), ".feather": _TABLE.format("feather"),
    ".csv": _TABLE.format("csv"), ".tsv": _TABLE.format("csv") + " with sep='\\t'", ".xlsx": _TABLE.format("excel"),
    ".gz": "decompress it first", ".zst": "decompress it first", ".zip": "unpack it first",
    ".bz2": "decompress it first", ".xz": "decompress it first",
    ".bin": "it is not text: give text, .jsonl or .json files", ".npy": "it is not text: give text, .jsonl or .json files",
    ".pt": "it is not text: give text, .jsonl or .json files",
    ".safetensors": "it is not text: give text, .jsonl or .json files"}


def builtin_documents() -> list[str]:
    """The embedded corpus, one document per pydoc topic, in a fixed order."""
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


# A dataset's held-out split by its file's (or directory's) name: test.jsonl, validation-00000-of-00001.jsonl, dev/
HELD_OUT_NAME = re.compile(r"(^|[/_.-])(test|testing|valid|validation|val|eval|evaluation|dev|heldout|held_out)"
                           r"($|[/_.-])", re.IGNORECASE)
# In a directory of structured records (JSON Lines), the text files a dataset's folder holds beside them (a
# Hugging Face dataset card is README.md): not read, and listed as such. In a directory of text, they are
# text like the others; given by name, such a file is read.
NOT_DATA_STEMS = {"readme", "license", "licence"}


PREPARED_FILE = re.compile(r"meta\.json|(train|val)(\.idx|\.loss)?\.bin")  # what `fuyou data prepare` writes
RECORD_LISTS = {"messages", "conversations", "prompt", "completion", "tools"}  # a record's own list fields


def json_type(v) -> str:
    """A JSON value's type in JSON's words (for messages: ``null``, not ``NoneType``)."""
    return {type(None): "null", bool: "boolean", int: "number", float: "number", list: "array", str: "string",
            dict: "object"}.get(type(v), type(v).__name__)


def iter_records(paths: list[str | Path], text_field: str = "text", held: bool = False) -> Iterator[tuple[dict, str]]:
    """(record, where) pairs from text files (one record ``{text_field: content}`` per file), JSON Lines
    files (``.jsonl``/``.ndjson``, one JSON object per line) and directories (searched recursively for
    those suffixes, in sorted order, hidden files and directories left out); ``where`` is "file:line"
    for error messages. What a directory holds and fuyou does not read is listed on stderr."""
    seen: set[Path] = set()  # files read already (a file given twice, or inside a directory also given)
    for p in map(Path, paths):
        if not p.exists():
            raise DataError(f"data path {p} does not exist; give a text file, a .jsonl file or a directory")
        if p.is_dir() and is_prepared(p):
            raise DataError(f"{p} is data `fuyou data prepare` wrote: train on it as the only data.path (not among "
                            f"others), and prepare again from the original files, not from it")
        if not p.is_dir() and PREPARED_FILE.fullmatch(p.name) and is_prepared(p.parent):  # (its train.bin "is not
            # text", its meta.json "none of the formats": a pass; the user's own files beside it, `--out .`, are data)
            raise DataError(f"{p} is a file of the data `fuyou data prepare` wrote in {p.parent}: give that directory "
                            f"as data.path")
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        records = p.is_dir() and any(f.suffix.lower() in JSONL_SUFFIXES for f in files)
        found, skipped = False, []
        if p.is_dir():  # (links to directories are not followed, and went unmentioned: a pass)
            links = [d for d in sorted(p.rglob("*")) if d.is_symlink()]
            skipped += [(d, "a link to a directory, not followed: give its target itself") for d in links if d.is_dir()]
            # (a link whose target is gone was left out without a word: a pass)
            skipped += [(d, "a link to nothing: its target is gone") for d in links if not d.exists()]
        for f in files:
            suffix = f.suffix.lower()
            if f.resolve() in seen:  # (tokenized twice, and a text could land in both splits: a pass)
                found = True
                print(f"fuyou: note: {f} is given twice (or also inside a directory given): read once",
                      file=sys.stderr)
                continue
            seen.add(f.resolve())
            if p.is_dir() and any(part.startswith(".") for part in f.relative_to(p).parts):
                skipped.append((f, "hidden"))
            elif records and f.name.split(".")[0].lower() in NOT_DATA_STEMS and suffix not in JSONL_SUFFIXES:
                skipped.append((f, "a dataset card or project file, not data: give it as a file of its own to "
                                   "train on it"))
            elif suffix in JSONL_SUFFIXES:
                found = True
                if not held and p.is_dir() and HELD_OUT_NAME.search(f.relative_to(p).as_posix()):  # (trained on in
                    # silence: a pass; ``held``: the held-out files themselves)
                    print(f"fuyou: note: {f} is named as a held-out split, and is trained on like every file of {p}; "
                          f"to evaluate on it instead, give it as data.eval_path (`fuyou data prepare --eval`) and "
                          f"the training files alone as data.path", file=sys.stderr)
                yield from _jsonl_records(f)
            elif suffix == ".json":
                if p.is_dir():  # (in a directory, .json files are often configs)
                    skipped.append((f, "a directory's .json files are not read: give such a file itself"))
                    continue
                found = True
                yield from _json_records(f, text_field)
            elif suffix in BINARY_SUFFIXES:
                if p.is_dir():
                    skipped.append((f, BINARY_SUFFIXES[suffix]))
                    continue
                raise DataError(f"{f} is a {suffix} file, which fuyou does not read as data: {BINARY_SUFFIXES[suffix]}")
            elif suffix in TEXT_SUFFIXES or not p.is_dir():
                text = _read_text(f)
                why = _json_lines_as_text(f, text)
                if why and p.is_dir():  # one such file does not stop a directory: it is listed as not read
                    skipped.append((f, "it looks like JSON Lines: rename it to .jsonl to read its records"))
                    continue
                if why:
                    raise DataError(why)
                found = True
                yield {text_field: text}, str(f)
            else:
                skipped.append((f, f"not {', '.join(sorted(TEXT_SUFFIXES | JSONL_SUFFIXES))}"))
        if skipped:
            listed = "; ".join(f"{f.relative_to(p)} ({why})" for f, why in skipped[:6])
            more = f"; and {len(skipped) - 6} more" if len(skipped) > 6 else ""
            print(f"fuyou: note: {p}: {len(skipped)} file(s) not read: {listed}{more}", file=sys.stderr)
        tokens = ("train.idx.bin", "val.bin")  # (beside train.bin: examples, or text's split)
        if not found and (p / "train.bin").is_file() and any((p / n).is_file() for n in tokens):  # ("holds no usable
            # files": a pass. Only where nothing else is read: nanoGPT's data directories hold train.bin and val.bin
            # beside the text they were made of)
            raise DataError(f"{p} looks like data `fuyou data prepare` wrote, but its meta.json is missing: prepare "
                            f"the data again into a new directory (`fuyou data prepare FILES --out NEW_DIR`; or remove "
                            f"{p} first)")
        if not found:
            raise DataError(
                f"{p} holds no usable files; expected {', '.join(sorted(TEXT_SUFFIXES | JSONL_SUFFIXES))} files "
                f"(a directory's .json files are not read: give such a file itself)"
            )


def _json_lines_as_text(f: Path, text: str) -> str | None:
    """Why a text file that is JSON Lines under another name is not read (it would be trained as one
    document of JSON syntax), or None."""
    first = next((line for line in text.splitlines() if line.strip()), "")
    if not first.lstrip().startswith("{"):
        return None
    try:
        rec = json.loads(first)
    except (ValueError, RecursionError):  # (not JSON, or JSON too deep or too long to parse)
        return None
    if isinstance(rec, dict):
        name = f"ends in {f.suffix!r}" if f.suffix else "has no extension"
        return (f"{f} looks like JSON Lines (its first line is a JSON object with keys {sorted(rec)[:6]}), but its "
                f"name {name}, so it would be trained on as one plain-text document; rename it to .jsonl to read its "
                f"records (to train on such text, write it as {{\"text\": ...}} records)")
    return None


def _read_text(f: Path) -> str:
    raw = f.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{f}: not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 1]!r}); {encoding_advice(raw)}, "
                        f"or, if it is not text, convert it") from None


def _parse_json(text: str, where: str):
    """``json.loads``, its every failure a DataError naming ``where``: besides a syntax error, nesting too
    deep for the parser (RecursionError) and an integer of more than 4,300 digits (ValueError) were
    tracebacks."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise
    except RecursionError:
        raise DataError(f"{where}: nested too deeply to parse (lists or objects inside each other by the "
                        f"thousand); remove or flatten that field") from None
    except ValueError as e:  # (Python's own advice, sys.set_int_max_str_digits, is not the user's to take)
        why = str(e).split("; use sys.")[0]
        raise DataError(f"{where}: cannot be parsed ({why}); remove or shorten that value") from None


def _json_records(path: Path, text_field: str = "text") -> Iterator[tuple[dict, str]]:
    """A ``.json`` file: an array of objects (as Alpaca's ``alpaca_data.json``), one example object, or
    JSON Lines under that name."""
    text = _read_text(path)
    try:
        data = _parse_json(text, str(path))
    except json.JSONDecodeError as e:
        if text.lstrip().startswith("["):  # an array, broken: its own error, where it is (read as lines, it
            # was "line 1: each line must be one JSON object" for a trailing comma at line 4; a pass)
            short = e.pos >= len(text.rstrip()) or (e.msg.startswith("Unterminated string")
                                                    and '"' not in text[e.pos + 1:])
            raise DataError(f"{path}:{e.lineno}:{e.colno}: not valid JSON ({e.msg}) in the array the file holds"
                            + ("; the file ends before the array does: it may be cut short (an interrupted "
                               "download or copy)" if short else "")) from None
        yield from _jsonl_records(path)  # one object a line, named .json
        return
    arrays = ([k for k, v in data.items() if isinstance(v, list) and k not in RECORD_LISTS]
              if isinstance(data, dict) else [])
    if isinstance(data, dict) and arrays and _is_record(data, text_field) and not any(
            isinstance(x, dict) for k in arrays for x in data[k]):  # an example with a list field of its own
        arrays = []  # ({"prompt", "completion", "tags": [...]}, read as a wrapper of 'tags': a pass; a list of objects
        # beside a "text" is a wrapper's, refused as before: a review)
    if isinstance(data, dict) and not arrays:  # one example (one object a line, of one line)
        _check_text(data, text, str(path))
        yield data, str(path)
        return
    if not isinstance(data, list):
        inside = f": give the array inside it ({arrays[0]!r}) as its own file" if arrays else ""
        raise DataError(f"{path}: a .json file must hold an array of example objects (or one object a line); it "
                        f"holds a JSON {json_type(data)}{inside}")
    for i, rec in enumerate(data):
        where = f"{path}[{i}]"
        if not isinstance(rec, dict):
            raise DataError(f"{where}: expected a JSON object, got a JSON {json_type(rec)}")
        _check_text(rec, text, where)
        yield rec, where


def iter_documents(paths: list[str | Path], jsonl_field: str = "text") -> Iterator[str]:
    """Documents (plain text) from ``iter_records``: each record's string field ``jsonl_field``."""
    for rec, where in iter_records(paths, jsonl_field):
        if not isinstance(rec.get(jsonl_field), str):
            raise DataError(f"{where}: expected an object with a string field {jsonl_field!r}")
        yield rec[jsonl_field]


def _jsonl_records(path: Path) -> Iterator[tuple[dict, str]]:
    """One object per line; a UTF-8 byte-order mark is accepted, other encodings are refused with
    the line they fail on."""
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not UTF-8 (byte {e.start}: {raw[e.start:e.start + 1]!r}); "
                                f"{encoding_advice(raw)}") from None
            if not line.strip():
                continue
            try:
                rec = _parse_json(line, f"{path}:{lineno}")
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg}); each line must be one JSON object") from e
            if not isinstance(rec, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got a JSON {json_type(rec)}")
            _check_text(rec, line, f"{path}:{lineno}")
            yield rec, f"{path}:{lineno}"


def _is_record(data: dict, text_field: str) -> bool:
    """An object with the keys of one of the formats (``formats.FORMAT_KEYS``, which imports this module)."""
    from fuyou.data.formats import FORMAT_KEYS

    return text_field in data or any(holds(data) for holds in FORMAT_KEYS.values())


def _check_text(rec, raw: str, where: str) -> None:
    """JSON's ``\\ud800``-style escapes can spell a lone UTF-16 surrogate, which is no character:
    refused here, where the line is known, rather than deep in a tokenizer."""
    if "\\ud" in raw or "\\uD" in raw:
        try:
            json.dumps(rec, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as e:
            bad = e.object[e.start:e.end].encode("unicode_escape").decode()
            raise DataError(f"{where}: holds {bad}, half of a UTF-16 surrogate pair and no character (a JSON escape "
                            f"of a broken string); remove or repair it") from None
