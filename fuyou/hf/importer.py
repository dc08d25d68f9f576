"""A Hugging Face model converted into a fuyou run directory to train from (``fuyou import``; the
run directory's config is written by ``fuyou.train.run.import_checkpoint``).

Writes ``RUN_DIR/model.safetensors`` (fp32, fuyou's names, streamed one tensor at a time: peak memory
is a few copies of the largest tensor, not the model) and ``RUN_DIR/hf/`` (the source's config.json,
tokenizer and other small files, for data preparation and export). The SSD training state (master weights,
Adam moments at zero) is built from these weights when training starts. The source's path and a
fingerprint of its weights are recorded, so that a LoRA adapter trained over the import names the source
as its base only while the source still holds those weights (``fuyou.hf.peft.hf_base_name``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from fuyou.errors import ConfigError
from fuyou.hf.source import HF_META, copy_small_files, open_checkpoint, tokenizer_dir


def convert_checkpoint(hf_dir: str | Path, out_dir: str | Path) -> Path:
    """Convert ``hf_dir`` into the run directory ``out_dir`` (module docstring); returns ``out_dir``."""
    from pydantic import ValidationError

    from fuyou.hf.weights import write_safetensors
    from fuyou.models import ModelConfig, StageModel

    src = Path(hf_dir).expanduser()
    if not src.exists():
        raise ConfigError(f"{src} does not exist; `fuyou import` reads a local Hugging Face model directory "
                          f"(config.json, *.safetensors, tokenizer files)")
    if src.is_file():  # (it said "no config.json" of config.json itself: a pass)
        hint = f": give its directory, {src.parent}" if src.name == "config.json" else ""
        raise ConfigError(f"{src} is a file{hint}; `fuyou import` reads a local Hugging Face model directory "
                          f"(config.json, *.safetensors, tokenizer files)")
    if not (src / "config.json").is_file() and (src / "config.toml").is_file():
        raise ConfigError(f"{src} is a fuyou run directory, which needs no import: train from it with fuyou train "
                          f"--init-from {src}, or write it for transformers with fuyou export {src} --out DIR")
    if not (src / "config.json").is_file() and (src / "adapter_config.json").is_file():  # (a hostile pass)
        raise ConfigError(f"{src} is a PEFT adapter (adapter_config.json), not a model: import its base model, "
                          f"and train the adapter on with --init-from BASE lora.init_from={src}")
    if not (src / "config.json").is_file():
        raise ConfigError(f"{src} is not a Hugging Face model directory (no config.json); `fuyou import` reads "
                          f"a local directory with config.json, *.safetensors and tokenizer files")
    ckpt = open_checkpoint(src)  # refuses unsupported architectures and missing weights
    ckpt.note_untrained()
    out = Path(out_dir).expanduser()
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} exists and is not empty; choose a new --out directory")
    try:
        model_cfg = ModelConfig(**ckpt.fields)
    except ValidationError as e:
        why = "; ".join(f"{'.'.join(map(str, x['loc'])) or 'model'}: {x['msg'].removeprefix('Value error, ')}"
                        for x in e.errors())  # (fuyou.config.explain would be an import cycle: config -> hf)
        raise ConfigError(f"{src / 'config.json'} describes a model fuyou cannot build: {why}") from None
    ckpt.check(model_cfg)
    if tokenizer_dir(src) is None:  # (the run's config needs it) said before the weights are converted
        raise ConfigError(f"{src} has no tokenizer files (tokenizer.json, tokenizer.model, ...), which `fuyou import` "
                          f"keeps beside the weights: copy them from the model's original repository into {src} and "
                          f"import again (or train from it directly: fuyou train --init-from {src} "
                          f"data.tokenizer=DIR)")
    from fuyou.hf.peft import base_fingerprint

    specs = StageModel(model_cfg).param_specs()
    source = {"fuyou_source": str(src.resolve()), "fuyou_source_fingerprint": base_fingerprint(src)}
    made = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        copy_small_files(src, out / HF_META)
        tensors = (ckpt.weights.tensor(key, spec.shape) for key, spec in specs.items())
        write_safetensors(out / "model.safetensors", {k: s.shape for k, s in specs.items()}, tensors,
                          {"fuyou_model": json.dumps(model_cfg.model_dump()), **source})
    except BaseException:  # a missing or corrupt tensor: nothing half-written is left to block a retry
        for f in [out] if made else list(out.iterdir()):
            if f.is_dir():
                shutil.rmtree(f)
            else:
                f.unlink()
        raise
    return out
