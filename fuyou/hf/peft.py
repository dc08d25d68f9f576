"""A LoRA run's adapters for PEFT and transformers: ``fuyou export RUN_DIR --out DIR [--merge]``.

A LoRA run (``lora.rank > 0``) saves only its adapters, ``RUN_DIR/adapter.safetensors`` (fp32, fuyou's
keys ``block.{i}.{matmul}.lora_A`` (rank, in) and ``.lora_B`` (out, rank); the model and LoRA configs in
the metadata), and a snapshot ``snapshots/step-N`` the same file. The base is the run's
``model.init_from``, found by following ``config.toml``'s ``init_from`` through snapshots and earlier
runs (``base_path``). Two exports:

- **adapter** (default): a PEFT LoRA adapter directory, ``adapter_config.json`` and
  ``adapter_model.safetensors``, plus the tokenizer files of the run's source. Load it with
  ``peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), DIR)``; the config names
  the base (``base_model_name_or_path``) when it is a Hugging Face directory (or a ``fuyou import`` of
  one), so ``peft.AutoPeftModelForCausalLM.from_pretrained(DIR)`` works too. A few megabytes.
- **merged** (``--merge``): the base with ``W + scale * B @ A`` in every adapted matmul, computed in fp32
  one tensor at a time and written by ``fuyou.hf.export`` as a full Hugging Face model directory (the
  base's size; no PEFT needed to load it).

PEFT's conventions, as checked against peft 0.21 (``tests/hf/test_peft.py`` loads both exports):

- Keys are the adapted module's path in the ``*ForCausalLM`` model under ``base_model.model.``, then
  ``lora_A.weight`` / ``lora_B.weight``, without the adapter name ("default") that the live modules
  carry: ``base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight``, GPT-2
  ``base_model.model.transformer.h.3.attn.c_attn.lora_B.weight``.
- ``lora_A``/``lora_B`` are ``nn.Linear`` whatever the base layer, so their weights are (r, in) and
  (out, r) as fuyou's, GPT-2's ``Conv1D`` included: nothing is transposed. ``fan_in_fan_out = true``
  (written for GPT-2) only tells PEFT to transpose ``B @ A`` when it merges into a Conv1D's (in, out)
  weight; PEFT sets it itself for Conv1D, with a warning, when the config says false.
- ``target_modules`` entries match a module whose name ends with ``.<entry>``, so GPT-2's
  ``c_proj`` takes both the attention's and the MLP's; an export adapting only one writes
  ``attn.c_proj`` or ``mlp.c_proj``. ``all-linear`` is written out as the module names it chose.
- ``scale = lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``), as in fuyou (``fuyou.models.lora``).
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from fuyou.errors import ConfigError
from fuyou.tomlfile import read_toml
from fuyou.hf.export import DTYPES, refuse_nonempty, save_atomic
from fuyou.hf.source import (copy_small_files, hf_files_dir, lora_run, snapshot_run, use_data_tokenizer,
                             use_run_chat_template)
from fuyou.hf.weights import hf_name

ADAPTER_FILE = "adapter.safetensors"  # as fuyou.train.run.save_adapters names it
PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


@dataclass
class Adapters:
    """A run's trained adapters: ``tensors`` by fuyou global key (fp32), the configs they were trained
    with, ``base`` (the run's ``model.init_from``; None: a seeded random base, ``seed``) and where they
    were read from (``origin``, for messages)."""

    tensors: dict[str, Tensor]
    model: dict
    lora: dict
    base: Path | None
    seed: int
    origin: str

    @property
    def family(self) -> str:
        return self.model["family"]

    @property
    def scale(self) -> float:
        from fuyou.models.lora import LoRAConfig

        return LoRAConfig(**self.lora).scale

    def matmuls(self) -> list[str]:
        """fuyou's adapted matmul names, in block order (``fuyou.models.lora.ALL_LINEAR``)."""
        from fuyou.models.lora import ALL_LINEAR

        found = {k.split(".")[2] for k in self.tensors if k.endswith(".lora_A")}
        return [n for n in ALL_LINEAR[self.family] if n in found]


def read_adapters(run_dir: str | Path) -> Adapters:
    """``run_dir/adapter.safetensors`` (a LoRA run or one of its snapshots) with its base, or a
    ConfigError saying what is missing."""
    from safetensors import SafetensorError, safe_open

    run = Path(run_dir).expanduser()
    file = run / ADAPTER_FILE
    try:
        with safe_open(str(file), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k).float() for k in f.keys()}  # noqa: SIM118 (a file handle)
    except (SafetensorError, OSError) as e:
        raise ConfigError(f"cannot read {file}: {e}; the file may be truncated or corrupt") from e
    if "fuyou_model" not in meta or "fuyou_lora" not in meta:
        raise ConfigError(f"{file} was not written by fuyou (no fuyou_model / fuyou_lora metadata)")
    return Adapters(tensors, json.loads(meta["fuyou_model"]), json.loads(meta["fuyou_lora"]), base_path(run),
                    run_seed(run), str(file))


def base_path(run: Path) -> Path | None:
    """The weights a LoRA run adapted: its ``model.init_from``, followed through snapshots (whose
    ``init_from`` is their run directory) and LoRA runs (which hold no weights) to a Hugging Face
    directory or a fuyou directory with ``model.safetensors``. None: the run started from a seeded
    random base. The path is returned even if it no longer exists (the adapter names it)."""
    return _base_chain(run)[1]


def _base_chain(run: Path) -> tuple[list[Path], Path | None]:
    """The directories ``base_path`` passes through from ``run`` (run first), and the base it ends at. A
    directory without config.toml whose ``base.json`` names the base (a run directory whose config was lost)
    ends there: it was merged over a seeded random base, in silence (a pass)."""
    p, passed = run, []
    for _ in range(16):
        passed.append(p)
        init = snapshot_run(p) or _run_config(p).get("model", {}).get("init_from")
        if not init:
            recorded = _recorded_base(p) if not (p / "config.toml").is_file() else None
            return passed, (Path(recorded["path"]) if recorded is not None else None)
        q = Path(init).expanduser()
        if (q / "config.json").is_file() or (q / "model.safetensors").is_file() or not q.is_dir() \
                or q.resolve() == p.resolve():
            return passed, q
        p = q
    raise ConfigError(f"{run}: model.init_from leads through more than 16 run directories; export from the base")


def _recorded_base(p: Path) -> dict | None:
    """``p``'s ``base.json`` (``record_base``), or None where it has none or it cannot be read."""
    try:
        want = json.loads((p / BASE_RECORD).read_text())
        return want if isinstance(want.get("path"), str) and isinstance(want.get("fingerprint"), str) else None
    except (OSError, ValueError, AttributeError):
        return None


BASE_RECORD = "base.json"  # a LoRA run's record of the base it adapts (``record_base``)
SAMPLES = 16               # evenly spaced 4 KiB reads a weight file contributes to ``base_fingerprint``


def base_fingerprint(base: Path) -> str:
    """A fingerprint of a base directory's weights: its config.json and ``files_fingerprint`` of every weight
    file in it."""
    import hashlib

    from fuyou.hf.weights import WEIGHT_SUFFIXES

    h = hashlib.sha256()
    if (base / "config.json").is_file():
        h.update((base / "config.json").read_bytes())
    _hash_files(h, sorted(p for p in base.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES))
    return h.hexdigest()


def files_fingerprint(files) -> str:
    """A fingerprint of weight files: each one's name and size, its first 64 KiB (a safetensors header names
    every tensor's shape and place), the first 64 bytes of every tensor of a safetensors file (a merge or an
    edit of any layer changes them) and ``SAMPLES`` 4 KiB reads spread over it. A few small reads a tensor:
    cheap at any size."""
    import hashlib

    h = hashlib.sha256()
    _hash_files(h, sorted(files))
    return h.hexdigest()


def _hash_files(h, files) -> None:
    import struct

    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}:{size};".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(64 * 1024))
            for i in range(SAMPLES):
                fh.seek(size * i // SAMPLES)
                h.update(fh.read(4096))
            if f.suffix == ".safetensors" and size >= 8:
                fh.seek(0)
                n = struct.unpack("<Q", fh.read(8))[0]
                try:
                    header = json.loads(fh.read(n)) if n < size else {}
                except ValueError:
                    header = {}
                for name in sorted(k for k in header if k != "__metadata__"):
                    offsets = header[name].get("data_offsets") if isinstance(header[name], dict) else None
                    if offsets:
                        fh.seek(8 + n + int(offsets[0]))
                        h.update(fh.read(min(64, int(offsets[1]) - int(offsets[0]))))


def record_base(run: Path) -> None:
    """At a LoRA run's start: which base it adapts and that base's ``base_fingerprint``, so an export that
    merges (or a PEFT adapter that names the base) can tell when the base directory changed since."""
    base = base_path(run)
    if base is None or not base.is_dir():
        return
    (run / BASE_RECORD).write_text(json.dumps({"path": str(base.resolve()), "fingerprint": base_fingerprint(base)})
                                   + "\n")


def base_changed(run: Path, base: Path | None) -> str | None:
    """Why ``base`` is not the base ``run`` recorded at its start (None: it is, or nothing was recorded). The
    record is looked for along the way ``base_path`` goes: a snapshot's run, a LoRA run it started from (a
    snapshot copied out of its run was merged over a changed base without a word: a pass)."""
    homes = _base_chain(run)[0]
    if run.parent.name == "snapshots":  # (a snapshot whose run has lost its config.toml)
        homes.append(run.parent.parent)
    rec, want = next(((p / BASE_RECORD, w) for p in homes if (w := _recorded_base(p)) is not None), (None, None))
    if rec is None:
        return None
    if base is None or not base.is_dir():
        return f"the run's base model {want['path']} is gone"
    if base_fingerprint(base) != want["fingerprint"]:
        return (f"the weight files in {base} are not the ones the run trained over (they changed since it started: "
                f"{rec} records their fingerprint)")
    return None


def run_seed(run: Path) -> int:
    """``train.seed`` of the run (a seeded random base is drawn from it)."""
    from fuyou.train.config import TrainConfig

    return int(_run_config(run).get("train", {}).get("seed", TrainConfig().seed))


def _run_config(run: Path) -> dict:
    """A run directory's ``config.toml`` as a dict ({} when it has none)."""
    if not (run / "config.toml").is_file():
        return {}
    try:
        return read_toml(run / "config.toml")
    except (OSError, ConfigError) as e:
        raise ConfigError(f"cannot read {run / 'config.toml'}: {e}") from e


def peft_key(key: str, family: str) -> str:
    """PEFT's name of fuyou adapter ``key`` (``block.3.q.lora_A``; module docstring)."""
    stem, _, which = key.rpartition(".")  # block.3.q, lora_A
    module = hf_name(f"{stem}.weight", family)[0].removesuffix(".weight")
    return f"{PEFT_PREFIX}{module}.{which}.weight"


def peft_names(adapters: Adapters) -> tuple[dict[str, str], list[str]]:
    """({fuyou key: PEFT key}, target_modules) for ``adapters`` (module docstring)."""
    family = adapters.family
    return {k: peft_key(k, family) for k in adapters.tensors}, hf_targets(family, adapters.matmuls())


def hf_targets(family: str, chosen: list[str]) -> list[str]:
    """PEFT's ``target_modules`` (and ``lora.targets``) for fuyou's matmuls ``chosen``: the module's last name,
    or its path in the layer where that name is also another matmul's (GPT-2's ``c_proj``)."""
    from fuyou.models.lora import HF_MODULE

    paths = HF_MODULE[family]
    targets = []
    for n in chosen:
        leaf = paths[n].rpartition(".")[2]
        same_leaf = [m for m, p in paths.items() if p.rpartition(".")[2] == leaf]
        name = leaf if all(m in chosen for m in same_leaf) else paths[n]
        if name not in targets:
            targets.append(name)
    return targets


def _peft_matmuls(conf: dict, family: str, layers: list[int], path) -> list[str]:
    """The matmuls (fuyou's names) an adapter config adapts, by PEFT's own matching over this model's module
    names: ``target_modules`` as a regular expression (a string: ``re.fullmatch``), or a list of names each
    matching a module that is it or ends in ``.name`` (PEFT writes ``all-linear`` out as every layer's full
    module names), within ``layers_to_transform``. fuyou adapts the same matmuls in every block: an adapter
    that adapts different ones in different layers is refused."""
    import re

    from fuyou.models.lora import ALL_LINEAR

    from fuyou.models.lora import resolve_targets

    targets = conf.get("target_modules")
    if not targets:  # PEFT's default for the architecture
        return resolve_targets(family, None)
    if targets == "all-linear" or (isinstance(targets, list) and "all-linear" in targets):
        return list(ALL_LINEAR[family])
    if conf.get("exclude_modules"):
        raise ConfigError(f"lora.init_from={path}: the adapter uses PEFT's exclude_modules, which fuyou does not "
                          f"train (the same matmuls in every block); it cannot be continued here")
    only = conf.get("layers_to_transform") if not isinstance(targets, str) else None  # (PEFT: list targets only)
    only = None if only is None else {only} if isinstance(only, int) else set(only)
    per_layer = {}
    for i in layers:
        chosen = []
        for n in ALL_LINEAR[family]:
            module = hf_name(f"block.{i}.{n}.weight", family)[0].removesuffix(".weight")
            if isinstance(targets, str):
                hit = re.fullmatch(targets, module) is not None
            else:
                hit = any(module == t or module.endswith("." + t) for t in targets)
            if hit and (only is None or i in only):
                chosen.append(n)
        per_layer[i] = chosen
    sets = {tuple(c) for c in per_layer.values()}
    if len(sets) > 1:
        why = "its layers_to_transform" if only is not None else "its target_modules"
        raise ConfigError(f"lora.init_from={path}: the adapter adapts different matmuls in different layers ({why}), "
                          f"which fuyou does not: it adapts the same matmuls in every block; it cannot be continued "
                          f"here")
    chosen = list(sets.pop()) if sets else []
    if not chosen:
        raise ConfigError(f"lora.init_from={path}: the adapter's target_modules {targets!r} match no matmul of this "
                          f"{family} model's blocks: it was trained on another architecture, or adapts modules fuyou "
                          f"does not (the LM head, the embeddings)")
    return chosen


def hf_base_name(base: Path | None) -> str | None:
    """What ``base_model_name_or_path`` can name: a Hugging Face directory, or the one a ``fuyou import``
    directory was converted from (its weights are that model's) while its weights are still the ones
    imported (their fingerprint, recorded by imports since 2026-12-05: a changed source was named in
    silence, and PEFT loaded the adapter onto other weights)."""
    if base is None:
        return None
    if (base / "config.json").is_file():
        return str(base.resolve())
    if (base / "model.safetensors").is_file():
        from safetensors import safe_open

        with safe_open(str(base / "model.safetensors"), framework="pt") as f:
            meta = f.metadata() or {}
        src = meta.get("fuyou_source")
        if src and (Path(src) / "config.json").is_file():
            was = meta.get("fuyou_source_fingerprint")
            return src if was is None or base_fingerprint(Path(src)) == was else None
    return None


def source_changed(base: Path | None) -> str | None:
    """The Hugging Face directory a ``fuyou import`` directory ``base`` was converted from, when its weights
    are no longer the ones imported (None otherwise)."""
    if base is None or not (base / "model.safetensors").is_file() or (base / "config.json").is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(base / "model.safetensors"), framework="pt") as f:
        src = (f.metadata() or {}).get("fuyou_source")
    return src if src and (Path(src) / "config.json").is_file() and hf_base_name(base) is None else None


def write_peft_adapter(run_dir: str | Path, out_dir: str | Path, dtype: str = "fp32",
                       adapters: Adapters | None = None, stream=None) -> list[str]:
    """A PEFT LoRA adapter directory from ``run_dir`` (module docstring); returns the files written.
    ``adapters``: default ``read_adapters(run_dir)``."""
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    run, out = Path(run_dir).expanduser(), Path(out_dir).expanduser()
    _check_empty(out)
    adapters = adapters or read_adapters(run)
    keys, targets = peft_names(adapters)
    base_name = hf_base_name(adapters.base)
    changed = base_changed(run, adapters.base)
    moved = source_changed(adapters.base) if adapters.base is not None and adapters.base.exists() else None
    meta_dir = hf_files_dir(run)
    if adapters.base is not None and not adapters.base.exists():
        base_name = str(adapters.base)  # as recorded: the adapter still names the base it was trained for
        # (the note said the tokenizer files were not copied where the run's own copy of them was: a pass)
        tok = ("its tokenizer files are copied from the run's copy" if meta_dir is not None else
               "its tokenizer files (kept there) are not copied")
        print(f"fuyou: note: the run's base model {adapters.base} is gone: the adapter names it as recorded, and "
              f"{tok}; put the base back there before loading the adapter", file=stream or sys.stderr)
    elif changed:
        print(f"fuyou: note: {changed}: the adapter names that directory, whose weights are not the ones it was "
              f"trained for; load it onto the original base", file=stream or sys.stderr)
    elif moved:
        print(f"fuyou: note: {moved}, which {adapters.base} was imported from, holds other weights now: the adapter "
              f"names no base model; load it onto the base exported with `fuyou export {adapters.base}`, or export "
              f"with --merge", file=stream or sys.stderr)
    elif base_name is None and adapters.base is not None:
        print(f"fuyou: note: {adapters.base} is a fuyou directory, not a Hugging Face model: the adapter names no "
              f"base model; load it onto the base exported with `fuyou export {adapters.base}`, or export with "
              f"--merge", file=stream or sys.stderr)
    elif base_name is None:  # (the note said to load it onto "the base exported with fuyou export": none can be)
        print(f"fuyou: note: the run trained over a random base drawn from train.seed={adapters.seed} (no "
              f"--init-from), which no model directory holds: the adapter names no base model and fits only that "
              f"base; export with --merge for a model transformers loads", file=stream or sys.stderr)
    lora = adapters.lora
    alpha = lora["alpha"]
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name, "revision": None,
        "r": lora["rank"], "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "lora_dropout": lora["dropout"], "target_modules": targets, "use_rslora": lora["use_rslora"],
        "init_lora_weights": "gaussian" if lora["init"] == "gaussian" else True,
        "fan_in_fan_out": adapters.family == "gpt", "bias": "none", "lora_bias": False, "use_dora": False,
        "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {},
        "alpha_pattern": {}, "exclude_modules": None, "inference_mode": True,
    }
    out.mkdir(parents=True, exist_ok=True)
    written = copy_small_files(meta_dir, out, skip=("config.json",)) if meta_dir is not None else []
    written += use_data_tokenizer(run, out, meta_dir, written, stream)
    written += use_run_chat_template(run, out, stream)
    tensors = {keys[k]: v.to(DTYPES[dtype]).contiguous() for k, v in adapters.tensors.items()}
    save_atomic(tensors, out / PEFT_WEIGHTS)
    (out / PEFT_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return written + [PEFT_WEIGHTS, PEFT_CONFIG]


class MergedWeights:
    """``tensor(key, shape)``: the base's fp32 weight plus ``scale * B @ A`` where ``key`` is adapted
    (the interface ``fuyou.hf.export`` reads). Memory: one tensor (a seeded base: one stage)."""

    def __init__(self, adapters: Adapters):
        from fuyou.hf.source import open_checkpoint

        self.adapters, self.model, self.family = adapters, adapters.model, adapters.family
        self.scale = adapters.scale
        if adapters.base is not None and not adapters.base.exists():
            raise ConfigError(f"the run's base model {adapters.base} (its model.init_from) is gone: --merge reads "
                              f"it; put it back, or export the adapter alone (without --merge)")
        self.base = open_checkpoint(adapters.base).weights if adapters.base is not None else None
        self._seeded_stage: dict[str, Tensor] = {}  # a seeded base: the values of the stage being read

    def tensor(self, key: str, shape) -> Tensor:
        t = self.base.tensor(key, shape) if self.base is not None else self._seeded(key)
        stem = key.removesuffix(".weight")
        a = self.adapters.tensors.get(f"{stem}.lora_A")
        if a is None or stem == key:
            return t
        b = self.adapters.tensors[f"{stem}.lora_B"]
        return t + self.scale * (b @ a)

    def _seeded(self, key: str) -> Tensor:
        """The seeded initial value of ``key``, as the trainers draw it (``Stage.init_params``)."""
        from fuyou.models import ModelConfig, StageModel

        if key not in self._seeded_stage:
            cfg = ModelConfig(**{k: v for k, v in self.model.items() if k not in ("init_from", "preset")})
            stage = next(s for s in StageModel(cfg).stages if any(s.key(n) == key for n in s.params))
            self._seeded_stage = stage.init_params(self.adapters.seed)
        return self._seeded_stage[key]


def write_merged(run_dir: str | Path, out_dir: str | Path, dtype: str = "fp32", shard_size: int = 2 * 1024**3,
                 adapters: Adapters | None = None) -> list[str]:
    """The base with the adapters merged, as a Hugging Face model directory (module docstring)."""
    from fuyou.hf.export import export_run

    run = Path(run_dir).expanduser()
    _check_empty(Path(out_dir).expanduser())
    adapters = adapters or read_adapters(run)
    changed = base_changed(run, adapters.base)
    if changed and adapters.base is not None and adapters.base.exists():
        raise ConfigError(f"{changed}: --merge would add the adapters to other weights than they were trained "
                          f"over. Put the original base back in {adapters.base}, or export the adapter alone "
                          f"(without --merge)")
    return export_run(run, out_dir, dtype, shard_size, weights=MergedWeights(adapters))


def _check_empty(out: Path) -> None:
    refuse_nonempty(out)


def _checked_config(conf, conf_file: Path) -> dict:
    """An adapter config's fields fuyou reads, each of the type PEFT writes (a hand-edited or foreign file
    crashed with a traceback: a list for the file, a number for target_modules, a regular expression that does
    not compile: an audit), with PEFT's defaults for a rank and alpha not given (``LoraConfig``'s 8 and 8, as
    PEFT loads such a file)."""
    import re

    def bad(field: str, what: str):
        return ConfigError(f"lora.init_from: {conf_file} is not a PEFT LoRA config: its {field} is "
                           f"{conf.get(field)!r}, not {what}; write the adapter again with peft's save_pretrained "
                           f"or `fuyou export`")

    if not isinstance(conf, dict):
        raise ConfigError(f"lora.init_from: {conf_file} holds a JSON {type(conf).__name__}, not the object of fields "
                          f"peft's save_pretrained writes")
    conf = {"r": 8, "lora_alpha": 8, **conf}
    if not isinstance(conf.get("peft_type", "LORA"), str):
        raise bad("peft_type", "a name (\"LORA\")")
    if not isinstance(conf["r"], int) or isinstance(conf["r"], bool) or conf["r"] < 1:
        raise bad("r", "a rank (a whole number from 1)")
    alpha = conf["lora_alpha"]
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise bad("lora_alpha", "a number")
    targets = conf.get("target_modules")
    if isinstance(targets, str):
        try:
            re.compile(targets)
        except re.error as e:
            raise bad("target_modules", f"a module name list or a regular expression ({e})") from None
    elif targets is not None and not (isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
        raise bad("target_modules", "a list of module names or a regular expression")
    only = conf.get("layers_to_transform")
    if only is not None and not (isinstance(only, int) and not isinstance(only, bool) or isinstance(only, list)
                                 and all(isinstance(i, int) and not isinstance(i, bool) for i in only)):
        raise bad("layers_to_transform", "a layer number or a list of them")
    return conf


def load_peft_adapter(path: str | Path, stages, family: str, cfg) -> dict[str, Tensor]:
    """``lora.init_from``: the adapters of a PEFT LoRA directory (``adapter_config.json``,
    ``adapter_model.safetensors``; the old ``.bin`` is not read) by fuyou global key, fp32, for
    ``stages`` (a ``StageModel``'s, with ``cfg``'s adapters attached) of a model of ``family``. Its rank, alpha, rsLoRA and adapted matmuls
    must be the run's: a ConfigError gives the settings that match it. Every adapter of the run must
    be in the file with its shape, and the file may hold no others (PEFT's ``modules_to_save`` and
    trained biases are refused: fuyou does not train them)."""
    from safetensors import SafetensorError, safe_open

    from fuyou.models.lora import resolve_targets

    d = Path(path).expanduser()
    conf_file, weights = d / PEFT_CONFIG, d / PEFT_WEIGHTS
    if not conf_file.is_file() and (d / "config.toml").is_file() and lora_run(d):
        raise ConfigError(f"lora.init_from={path} is a fuyou LoRA run directory: export its adapter first (`fuyou "
                          f"export {path} --out DIR`) and give lora.init_from=DIR")
    if not conf_file.is_file() or not weights.is_file():
        raise ConfigError(f"lora.init_from={path}: not a PEFT LoRA adapter directory (it needs {PEFT_CONFIG} and "
                          f"{PEFT_WEIGHTS}: what peft's save_pretrained and `fuyou export` of a LoRA run write)")
    try:
        conf = json.loads(conf_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"lora.init_from: {conf_file} is not JSON ({e})") from None
    conf = _checked_config(conf, conf_file)
    if conf.get("peft_type", "LORA") != "LORA":
        raise ConfigError(f"lora.init_from: {d} is a {conf.get('peft_type')} adapter; fuyou trains LoRA")
    unsupported = [k for k in ("rank_pattern", "alpha_pattern") if conf.get(k)] + [
        k for k in ("use_dora", "lora_bias", "use_qalora") if conf.get(k)]
    if unsupported:
        raise ConfigError(f"lora.init_from={path}: the adapter uses PEFT's {', '.join(unsupported)}, which fuyou does "
                          f"not train (one rank and alpha for every adapter, plain LoRA); it cannot be continued here")
    layers = sorted({int(st.key(local).split(".")[1]) for st in stages for local in st.adapters
                     if st.key(local).startswith("block.")})
    their_matmuls = _peft_matmuls(conf, family, layers, path)
    ours = resolve_targets(family, cfg.targets)
    want = {"lora.rank": (conf.get("r"), cfg.rank), "lora.alpha": (conf.get("lora_alpha"), cfg.alpha),
            "lora.use_rslora": (bool(conf.get("use_rslora", False)), cfg.use_rslora),
            "lora.targets": (their_matmuls, ours)}
    differ = [k for k, (a, b) in want.items() if a != b and not (k == "lora.alpha" and a is not None and
                                                               float(a) == float(b))]
    if differ:
        suggest = (f"lora.rank={conf.get('r')} lora.alpha={conf.get('lora_alpha')} "
                   f"lora.use_rslora={str(bool(conf.get('use_rslora', False))).lower()} "
                   f"lora.targets=[{','.join(hf_targets(family, their_matmuls))}]")
        raise ConfigError(f"lora.init_from={path}: the adapter was trained with other settings ({', '.join(differ)} "
                          f"{'differs' if len(differ) == 1 else 'differ'}); train it with its own: {suggest}")
    if conf.get("modules_to_save") or conf.get("bias", "none") != "none":
        raise ConfigError(f"lora.init_from={path}: the adapter also trains modules_to_save or biases, which fuyou "
                          f"does not; only LoRA's A and B matrices can be continued")
    try:
        with safe_open(str(weights), framework="pt") as f:
            found = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (a file handle)
    except (SafetensorError, OSError) as e:
        raise ConfigError(f"lora.init_from: cannot read {weights}: {e}; the file may be truncated or corrupt") from None
    out, used = {}, set()
    for st in stages:
        for local, spec in st.adapters.items():
            key = st.key(local)
            name = peft_key(key, family)
            t = found.get(name)
            if t is None:  # a PEFT key may carry the adapter's name ("default") before .weight
                name = name.removesuffix(".weight") + ".default.weight"
                t = found.get(name)
            if t is None:
                raise ConfigError(f"lora.init_from: {weights} has no {peft_key(key, family)} (the run's {key}); the "
                                  f"adapter does not fit this model")
            if tuple(t.shape) != tuple(spec.shape):
                raise ConfigError(f"lora.init_from: {name} in {weights} is {tuple(t.shape)}, the run's {key} is "
                                  f"{tuple(spec.shape)}: the adapter was trained on a model of another shape")
            if not torch.isfinite(t).all():  # (it trained, then failed at step 1 naming the initial weights: an audit)
                raise ConfigError(f"lora.init_from: {name} in {weights} holds non-finite values (NaN or inf): the "
                                  f"adapter was saved from a run that diverged; start from an earlier one")
            out[key] = t.float()
            used.add(name)
    extra = sorted(k for k in found if k not in used)
    if extra:
        raise ConfigError(f"lora.init_from: {weights} holds {len(extra)} tensor(s) this run has no adapter for "
                          f"({', '.join(extra[:3])}{', ...' if len(extra) > 3 else ''}): the adapter does not fit this "
                          f"model")
    return out

