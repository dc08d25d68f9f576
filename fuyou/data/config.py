"""Data configuration."""

from __future__ import annotations

import json
import os
import shlex

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


def is_prepared(path) -> bool:
    """Whether ``path`` is a directory ``fuyou data prepare`` wrote: its meta.json is fuyou's (a dataset may
    ship a meta.json of its own, and is then text)."""
    import json

    try:
        meta = json.loads((Path(path) / "meta.json").read_text())
    except (OSError, ValueError):
        # a damaged meta.json beside prepared tokens is prepared data (read_data says what is wrong), not a text
        # directory "with no usable files" (a pass)
        return (Path(path) / "meta.json").is_file() and (Path(path) / "train.bin").is_file()
    return isinstance(meta, dict) and ("kind" in meta or {"dtype", "train_tokens"} <= meta.keys())


JSONL_SUFFIXES = {".jsonl", ".ndjson"}  # files of JSON Lines records (fuyou.data.corpus reads them)


def leftover_kind(d: Path, name: str) -> str | None:
    """What a ``replace_prepared`` into ``name`` that was killed left in ``d``: "prepare" (a new directory not yet
    in place) or "old" (the data it moved aside), named ``.NAME.KIND-PID-TAG`` with the PID no longer running;
    None for anything else (a PID still running, or one from another container's namespace, is not ours to
    judge). ``sweep_leftovers`` and ``swapped_aside`` read the names so. (Here, not in ``dataset`` beside
    ``replace_prepared``, which makes them: the config does not import the data's code.)"""
    head = f".{name}."
    if not d.name.startswith(head) or not d.is_dir() or d.is_symlink():
        return None
    kind, _, rest = d.name[len(head):].partition("-")
    pid = rest.split("-", 1)[0]
    if kind not in ("prepare", "old") or not pid.isdigit():
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return kind
    except OSError:
        pass
    return None  # (still running)


def swapped_aside(path: str | Path) -> Path | None:
    """The old data of a ``replace_prepared`` killed between its two renames, where ``path`` is gone: the
    directory it moved aside (``leftover_kind`` "old"), else None. A run told only "does not exist" did not
    know its data was one ``mv`` away (session 17's note)."""
    p = Path(os.path.abspath(path))
    if p.exists() or not p.parent.is_dir():
        return None
    return next((d for d in sorted(p.parent.glob(f".{p.name}.old-*"))
                 if leftover_kind(d, p.name) == "old" and (d / "meta.json").is_file()), None)


class DataConfig(BaseModel):
    """Where training tokens come from."""

    model_config = ConfigDict(extra="forbid")

    source: Literal["builtin", "text", "prepared", "synthetic"] = Field(
        "builtin",
        description="'builtin': the embedded English corpus (Python's pydoc topics, no download); "
        "'text': text/JSONL files or directories at `path`, tokenized at start-up; "
        "'prepared': a directory made by `fuyou data prepare`; 'synthetic': random tokens (benchmarks). "
        "With data.path, the path decides between 'text' and 'prepared' (a directory with meta.json is prepared).",
    )
    path: list[str] = Field(
        default_factory=list, description="Files or directories for source 'text'; one directory for 'prepared'."
    )
    tokenizer: str = Field(
        "auto", description="'byte' (UTF-8 bytes), a local Hugging Face tokenizer directory (needs the hf extra), "
        "or 'auto': the tokenizer of model.init_from when it has one, else 'byte'."
    )
    format: Literal["auto", "text", "prompt_completion", "alpaca", "messages", "sharegpt"] = Field(
        "auto", description="Record format of JSON-lines files (fuyou/data/formats.py): 'text' ({jsonl_field: ...}), "
        "'prompt_completion' ({prompt, completion|response|output}), 'alpaca' ({instruction, input, output}), "
        "'messages' ({messages: [{role, content}, ...]}, rendered with the tokenizer's chat template), 'sharegpt' "
        "({conversations: [{from, value}, ...]}, read as messages); "
        "'auto' detects it from the first record.",
    )
    train_on_prompt: bool | None = Field(
        None, description="Fine-tuning formats: loss on every token, not only on the completion / assistant turns. "
        "Unset: false, or for prepared data what `fuyou data prepare` was given.")
    packing: bool = Field(
        True, description="Fine-tuning formats: lay several examples into one row (attention and positions kept "
        "apart per example) instead of one padded example per row.")
    eval_path: list[str] = Field(
        default_factory=list, description="A separate held-out file or directory (same format as data.path); "
        "unset: data.val_fraction of the data is held out.")
    seq_len: int = Field(128, ge=1, description="Tokens per training sequence.")
    val_fraction: float = Field(0.05, ge=0, lt=1, description="Share held out for evaluation: of plain text's "
                                "tokens, of fine-tuning examples (each by its content: about that share) (0: none, "
                                "evaluation off, unless data.eval_path gives held-out files).")
    jsonl_field: str = Field("text", description="Field holding the document text in JSON-lines files.")

    @field_validator("path", "eval_path", mode="before")
    @classmethod
    def _one_path(cls, v):
        v = [v] if isinstance(v, str) else v
        if isinstance(v, list) and any(isinstance(p, str) and not p.strip() for p in v):  # (`data.path=`: a pass)
            raise ValueError("an empty path: give a file or directory ([] for none)")
        # (~ as a shell would: "~/data" was refused as missing, where --init-from took it: a pass)
        return [os.path.expanduser(p) if isinstance(p, str) else p for p in v] if isinstance(v, list) else v

    @model_validator(mode="before")
    @classmethod
    def _source_from_path(cls, data):
        """``data.path`` given without ``data.source``: a prepared directory (it has meta.json) or text. The
        path decides between those two even when a source is given: a run's config.toml records the source
        its path implied, and `--config RUN/config.toml data.path=OTHER` of the other kind was refused with an
        error about the wrong thing (a prepared directory "holds no usable files")."""
        if isinstance(data, dict) and data.get("path") and data.get("source", "text") in ("text", "prepared"):
            paths = [data["path"]] if isinstance(data["path"], str) else data["path"]
            if len(paths) == 1:  # (several paths: text, or an explicit 'prepared' refused below as such)
                # (~ expanded first: "~/prepared" was read as text, a review)
                prepared = isinstance(paths[0], str) and is_prepared(os.path.expanduser(paths[0]))
                data = {**data, "source": "prepared" if prepared else "text"}
            elif "source" not in data:
                data = {**data, "source": "text"}
        return data

    @property
    def may_pack(self) -> bool:
        """Rows may hold several packed examples (fine-tuning records with ``packing``), so attention takes a
        mask: the activation estimates count it (``fuyou.engine.budget.saved_block_bytes``). Decided from
        the settings (the data is read later): plain text (``format='text'``, the embedded corpus) never packs."""
        if not self.packing or self.source not in ("text", "prepared") or self.format == "text":
            return False
        if self.source == "prepared":  # examples (meta.json's kind), not a token stream
            try:
                return json.loads((Path(self.path[0]) / "meta.json").read_text()).get("kind") == "examples"
            except (OSError, ValueError, AttributeError):
                return True
        if self.format != "auto":
            return True
        # auto: records are JSON Lines files (as the reader knows them); plain text files never pack
        def records(f: Path) -> bool:
            return f.suffix.lower() in JSONL_SUFFIXES

        return any(records(Path(p)) or Path(p).suffix.lower() == ".json"  # (a .json file given by name: records)
                   or (Path(p).is_dir() and any(records(f) for f in Path(p).rglob("*"))) for p in self.path)

    @model_validator(mode="after")
    def _check_paths(self) -> "DataConfig":
        for p in self.eval_path:
            if not Path(p).exists():
                raise ValueError(f"data.eval_path {p!r} does not exist")
            if is_prepared(p):
                raise ValueError(f"data.eval_path {p!r} is a `fuyou data prepare` directory: held-out files are given "
                                 f"as they are (.jsonl, text) and tokenized at start-up, or prepared beside the "
                                 f"training data (`fuyou data prepare TRAIN --eval HELD_OUT --out DIR`)")
        if self.path and self.source in ("builtin", "synthetic"):
            raise ValueError(f"data.path {self.path} is given, but data.source={self.source!r} does not read it "
                             f"(a config file may have set it): set data.source='text' (or 'prepared' for a "
                             f"`fuyou data prepare` directory), or drop data.path (a run started so trained the "
                             f"embedded corpus: resume it with --resume RUN_DIR data.path=[])")
        if self.eval_path and self.source not in ("text", "prepared"):
            raise ValueError("data.eval_path needs data.source 'text' or 'prepared' (a held-out file for your data)")
        if self.source in ("text", "prepared"):
            if not self.path:
                raise ValueError(f"data.source={self.source!r} needs data.path (a file or directory)")
            for p in self.path:
                if not Path(p).exists():
                    aside = swapped_aside(p)
                    if aside is not None:
                        raise ValueError(f"data path {p!r} does not exist: a `fuyou data prepare` into it was killed "
                                         f"while putting new data in place, and the data it held is in {aside}; "
                                         f"put it back with `mv {shlex.quote(str(aside))} {shlex.quote(p)}` (or "
                                         f"prepare the data again)")
                    raise ValueError(f"data path {p!r} does not exist; check the path (data.path=WHERE_IT_IS, also "
                                     f"with --resume)")
            for key, paths in (("data.path", self.path), ("data.eval_path", self.eval_path)):
                empty = [p for p in paths if Path(p).is_file() and Path(p).stat().st_size == 0]
                if paths and len(empty) == len(paths):  # (refused by train's loading only: `fuyou plan` planned
                    # it, a pass; an empty file beside others with text is only their share, nothing)
                    what = "and the others are empty files" if len(empty) > 1 else "is an empty file"
                    raise ValueError(f"{key} {empty[0]!r} {what}: no text to "
                                     f"{'train' if key == 'data.path' else 'evaluate'} on; check the file")
            if self.source == "prepared" and len(self.path) != 1:
                raise ValueError("data.source='prepared' takes exactly one directory in data.path")
        return self
