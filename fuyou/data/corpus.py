"""Text sources: the embedded default corpus and user files (text, directories, JSON lines).

The embedded corpus is the Python standard library's ``pydoc_data.topics``: about 460 KB of real
English technical prose (the language reference's topics) that ships with every CPython, so the
default run needs no download.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from fuyou.errors import DataError

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text"}


def builtin_documents() -> list[str]:
    """The embedded corpus, one document per pydoc topic, in a fixed order."""
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def iter_records(paths: list[str | Path], text_field: str = "text") -> Iterator[tuple[dict, str]]:
    """(record, where) pairs from text files (one record ``{text_field: content}`` per file), JSONL files
    (one JSON object per line) and directories (searched recursively for those suffixes, in sorted
    order); ``where`` is "file:line" for error messages."""
    for p in map(Path, paths):
        if not p.exists():
            raise DataError(f"data path {p} does not exist; give a text file, a .jsonl file or a directory")
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        found = False
        for f in files:
            if f.suffix == ".jsonl":
                found = True
                yield from _jsonl_records(f)
            elif f.suffix in TEXT_SUFFIXES or not p.is_dir():
                found = True
                yield {text_field: f.read_text(encoding="utf-8", errors="replace")}, str(f)
        if not found:
            raise DataError(
                f"{p} holds no usable files; expected {', '.join(sorted(TEXT_SUFFIXES))} or .jsonl files"
            )


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
                raise DataError(f"{path}:{lineno}: not UTF-8 (byte {e.start}: {raw[e.start:e.start + 1]!r}); save "
                                f"the file as UTF-8 (for example `iconv -f latin1 -t utf-8`)") from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg}); each line must be one JSON object") from e
            if not isinstance(rec, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            yield rec, f"{path}:{lineno}"
