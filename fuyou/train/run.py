"""Run directories: the resolved config, the metrics log and the final weights."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from fuyou.config import FuyouConfig, to_toml
from fuyou.errors import ConfigError


def make_run_dir(cfg: FuyouConfig) -> Path:
    """Create a new run directory and write the resolved config into it. Never reuses a directory."""
    parent = Path(cfg.run.out_dir)
    name = cfg.run.name or f"{cfg.model.preset or cfg.model.family}-{time.strftime('%Y%m%d-%H%M%S')}"
    path = parent / name
    if cfg.run.name is None:
        n = 1
        while path.exists():
            n += 1
            path = parent / f"{name}-{n}"
    try:
        path.mkdir(parents=True, exist_ok=False)
    except FileExistsError:
        raise ConfigError(f"run directory {path} already exists; choose another run.name") from None
    except OSError as e:
        raise ConfigError(f"cannot create run directory {path}: {e.strerror}; check run.out_dir") from e
    (path / "config.toml").write_text(to_toml(cfg))
    return path


def save_weights(path: Path, params: dict[str, torch.Tensor], cfg: FuyouConfig) -> Path:
    """fp32 weights by global key (shared parameters once, at their owner), atomically (tmp + rename)."""
    out = path / "model.safetensors"
    tmp = path / "model.safetensors.tmp"
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in params.items()}
    save_file(tensors, str(tmp), metadata={"fuyou_model": json.dumps(cfg.model.model_dump())})
    tmp.replace(out)
    return out
