"""Data configuration."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class DataConfig(BaseModel):
    """Where training tokens come from."""

    model_config = ConfigDict(extra="forbid")

    source: Literal["builtin", "text", "prepared", "synthetic"] = Field(
        "builtin",
        description="'builtin': the embedded English corpus (Python's pydoc topics, no download); "
        "'text': text/JSONL files or directories at `path`, tokenized at start-up; "
        "'prepared': a directory made by `fuyou data prepare`; 'synthetic': random tokens (benchmarks).",
    )
    path: list[str] = Field(
        default_factory=list, description="Files or directories for source 'text'; one directory for 'prepared'."
    )
    tokenizer: str = Field(
        "byte", description="'byte' (UTF-8 bytes) or a local Hugging Face tokenizer directory (needs the hf extra)."
    )
    seq_len: int = Field(128, ge=1, description="Tokens per training sequence.")
    val_fraction: float = Field(0.05, gt=0, lt=1, description="Share of tokens held out for evaluation.")
    jsonl_field: str = Field("text", description="Field holding the document text in JSON-lines files.")

    @field_validator("path", mode="before")
    @classmethod
    def _one_path(cls, v):
        return [v] if isinstance(v, str) else v

    @model_validator(mode="after")
    def _check_paths(self) -> "DataConfig":
        if self.source in ("text", "prepared"):
            if not self.path:
                raise ValueError(f"data.source={self.source!r} needs data.path (a file or directory)")
            for p in self.path:
                if not Path(p).exists():
                    raise ValueError(f"data path {p!r} does not exist; check the path or use data.source='builtin'")
            if self.source == "prepared" and len(self.path) != 1:
                raise ValueError("data.source='prepared' takes exactly one directory in data.path")
        return self
