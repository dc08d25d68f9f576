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


def iter_documents(paths: list[str | Path], jsonl_field: str = "text") -> Iterator[str]:
    """Documents from text files, JSONL files (one document per line, field ``jsonl_field``) and
    directories (searched recursively for those suffixes, in sorted order)."""
    for p in map(Path, paths):
        if not p.exists():
            raise DataError(f"data path {p} does not exist; give a text file, a .jsonl file or a directory")
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        found = False
        for f in files:
            if f.suffix == ".jsonl":
                found = True
                yield from _jsonl_documents(f, jsonl_field)
            elif f.suffix in TEXT_SUFFIXES or not p.is_dir():
                found = True
                yield f.read_text(encoding="utf-8", errors="replace")
        if not found:
            raise DataError(
                f"{p} holds no usable files; expected {', '.join(sorted(TEXT_SUFFIXES))} or .jsonl files"
            )


def _jsonl_documents(path: Path, field: str) -> Iterator[str]:
    """One document per line; a UTF-8 byte-order mark is accepted, other encodings are refused with
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
            if not isinstance(rec, dict) or not isinstance(rec.get(field), str):
                raise DataError(f"{path}:{lineno}: expected an object with a string field {field!r}")
            yield rec[field]
