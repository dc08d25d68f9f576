"""``fuyou export RUN_DIR --out HF_DIR``: a run's weights as a Hugging Face model directory.

Reads ``RUN_DIR/model.safetensors`` (the fp32 master weights, which the engine streams out of the SSD
store at the end of training, or a snapshot's: ``RUN_DIR/snapshots/step-N``) one tensor at a time, or,
for an offloaded run stopped before it saved them, its last commit's masters from the SSD state
(``fuyou.train.run.export_run_dir`` passes ``fuyou.engine.committed``'s reader), and writes shards in Hugging Face's names and
layout: ``model.safetensors`` when one shard holds everything, else ``model-0000i-of-0000N.safetensors``
with ``model.safetensors.index.json``. Memory is bounded by one shard. ``config.json`` comes from the
config the run started from (``model.init_from``, followed through earlier runs) with the shape fields
and dtype updated, or is written fresh for a model trained from scratch; the tokenizer and other small
files of that source are copied. ``transformers.AutoModelForCausalLM.from_pretrained(HF_DIR)`` loads it.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from fuyou.errors import ConfigError
from fuyou.hf.config_map import to_hf
from fuyou.hf.source import (copy_small_files, data_tokenizer, hf_files_dir, read_json, use_data_tokenizer,
                             use_run_chat_template)
from fuyou.hf.weights import FuyouWeights, hf_name

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def refuse_nonempty(out: Path) -> None:
    """An export's --out: new or empty. One that holds weights and no config (written last) is an export
    stopped before it finished (a pass killed one: "not empty" did not say so)."""
    names = {p.name for p in out.iterdir()} if out.is_dir() else set()
    if not names and not out.is_file():
        return
    unfinished = (not names & {"config.json", "adapter_config.json"}
                  and any(n.endswith(".safetensors") or ".tmp" in n for n in names))
    raise ConfigError(f"{out} exists and is not empty" + ("; it holds an export stopped before it finished (weights, "
                      "no config.json): remove it and export again, or" if unfinished else ";") +
                      " choose a new --out directory")


def _umask() -> int:
    """This process's umask, read without changing it where Linux says it (``/proc/self/status``)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_atomic(tensors: dict, path: Path) -> None:
    """safetensors' save_file to a temporary name, then renamed: a file under its own name is whole."""
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp")
    try:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        os.chmod(tmp, 0o666 & ~_umask())  # (safetensors makes its file 0600: an export others could not read)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def export_run(run_dir: str | Path, out_dir: str | Path, dtype: str = "fp32",
               shard_size: int = 2 * 1024**3, weights=None) -> list[str]:
    """Export ``run_dir`` to ``out_dir`` (module docstring). Returns the names of the files written.
    ``weights``: where the fp32 weights come from (``tensor(key, shape)``, a ``model`` dict and a
    ``family``); default: ``run_dir/model.safetensors``."""
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if shard_size < 1:
        raise ConfigError(f"--shard-size must be positive, got {shard_size}")
    run = Path(run_dir).expanduser()
    weights_file = run / "model.safetensors"
    if weights is None and (run / "config.json").is_file() and not (run / "config.toml").is_file():
        raise ConfigError(f"{run} is a Hugging Face model directory, not a fuyou run: transformers loads it as it "
                          f"is (nothing to export); to train it: fuyou train --init-from {run}")
    out = Path(out_dir).expanduser()
    refuse_nonempty(out)
    if weights is None:
        if (run / "adapter_config.json").is_file() and not (run / "config.toml").is_file():
            raise ConfigError(f"{run} is a PEFT adapter directory (an export of a LoRA run, or PEFT's own), not a "
                              f"fuyou run: peft loads it as it is; to merge it, export the LoRA run it came from with "
                              f"--merge")
        if not weights_file.is_file():
            raise ConfigError(f"{run} has no model.safetensors; export a finished run (run.save_weights=true) or a "
                              f"directory made by `fuyou import`")
        weights = FuyouWeights(weights_file)
    return _export(weights, run, out, dtype, shard_size)


BYTE_MARK = "fuyou_tokenizer"  # config.json: "byte" where the model was trained on fuyou's byte ids


def _trained_on_bytes(run: Path) -> bool:
    """The run (or snapshot) read its data as bytes: its config.toml's data.tokenizer (a preset on the embedded
    corpus or text files resolves 'auto' to 'byte'; prepared data records its tokenizer elsewhere: not told)."""
    from fuyou.tomlfile import read_toml

    try:
        data = read_toml(run / "config.toml").get("data", {})
    except (OSError, ConfigError):
        return False
    return data.get("tokenizer") == "byte" and data.get("source", "builtin") in ("builtin", "text")


def _export(weights, run: Path, out: Path, dtype: str, shard_size: int) -> list[str]:
    from fuyou.models import ModelConfig, StageModel

    model = ModelConfig(**{k: v for k, v in weights.model.items() if k not in ("init_from", "preset")})
    specs = StageModel(model).param_specs()

    # Plan the shards from the shapes, so each name carries the shard count before anything is written.
    size = DTYPES[dtype].itemsize
    shards: list[list[str]] = [[]]
    used = 0
    for key, spec in specs.items():
        n = spec.numel * size
        if shards[-1] and used + n > shard_size:
            shards.append([])
            used = 0
        shards[-1].append(key)
        used += n
    names = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]

    meta_dir = hf_files_dir(run)
    template = read_json(meta_dir / "config.json") if meta_dir is not None else None
    config = to_hf(model, dtype, template)  # before any shard: a model no architecture computes is refused (it
    on_bytes = False                         # was refused after its weights were written: a pass)
    if meta_dir is None and data_tokenizer(run, None)[0] is None:  # (an export without a tokenizer, and nothing
        # said so: a new-user pass; one that carries the data's tokenizer says that, ``use_data_tokenizer``)
        import sys

        on_bytes = _trained_on_bytes(run)
        if on_bytes:  # recorded, so that --init-from the export trains on bytes again (it was refused: a pass)
            print(f"fuyou: note: {run} was trained from a preset on byte ids (fuyou's byte tokenizer: a token is a "
                  f"byte's value), which has no tokenizer files: config.json records it (fuyou_tokenizer=byte), "
                  f"and `fuyou train --init-from` the export reads its data as bytes again", file=sys.stderr)
        else:
            print(f"fuyou: note: no Hugging Face model is behind {run} (trained from a preset, or its source is "
                  f"gone): the export has no tokenizer files (fuyou's byte tokenizer has none); add those of the "
                  f"tokenizer the data was prepared with, if any, before loading it with a tokenizer", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    written = copy_small_files(meta_dir, out, skip=("config.json",)) if meta_dir is not None else []
    written += use_data_tokenizer(run, out, meta_dir, written)
    written += use_run_chat_template(run, out)
    weight_map: dict[str, str] = {}
    try:
        for keys, name in zip(shards, names):
            tensors = {}
            for key in keys:
                hf_key, transposed = hf_name(key, model.family)
                t = weights.tensor(key, specs[key].shape)
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    raise ConfigError(f"{key} holds non-finite values (NaN or inf): its weights file is damaged (a "
                                      f"training step with a non-finite loss or norm is never committed); nothing "
                                      f"was written. Export a snapshot or resume the run from its last commit")
                if dtype == "fp16" and t.numel() and (big := t.abs().max().item()) > torch.finfo(torch.float16).max:
                    raise ConfigError(f"{key} holds values up to {big:.4g}, beyond fp16's largest (65504): in fp16 "
                                      f"they would be inf. Export --dtype bf16 (fp32's range) or fp32; nothing was "
                                      f"written")
                tensors[hf_key] = (t.t() if transposed else t).to(DTYPES[dtype]).contiguous()
                weight_map[hf_key] = name
            save_atomic(tensors, out / name)
            del tensors
    except BaseException:  # (out was empty or absent: export_run checked) no half-written model is left
        for f in [*written, *names]:
            (out / f).unlink(missing_ok=True)
        raise
    written += names
    if len(shards) > 1:
        total = sum(math.prod(s.shape) * size for s in specs.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        written.append("model.safetensors.index.json")
    tmp = out / ".config.json.tmp"  # last, and whole: an export with a config.json finished (refuse_nonempty)
    if on_bytes:
        config[BYTE_MARK] = "byte"
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tmp.replace(out / "config.json")
    return written + ["config.json"]
