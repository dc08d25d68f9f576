"""The top-level configuration: one section per component, each defined beside its code.

Precedence, lowest first: field defaults, the ``--config`` file (TOML), command-line flags, then
``section.key=value`` overrides. TOML because Python reads it with the standard library (``tomllib``),
its values are typed (``steps = 100`` is an int, ``ssd_dirs = ["/a", "/b"]`` a list) and it has no
YAML-style surprises (``no`` -> False). The resolved config is written back as TOML into the run
directory, so ``fuyou train --config runs/X/config.toml`` repeats a run.
"""

from __future__ import annotations

import json
import os
import sys
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import field_validator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from fuyou.data.config import DataConfig
from fuyou.engine.config import OffloadConfig
from fuyou.errors import ConfigError
from fuyou.models.config import ModelConfig
from fuyou.models.config import preset
from fuyou.models.lora import LoRAConfig
from fuyou.optim.config import AdamWConfig
from fuyou.planner.config import HardwareConfig
from fuyou.tomlfile import read_toml
from fuyou.train.config import TrainConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class RunConfig(BaseModel):
    """Where a run writes its outputs."""

    model_config = ConfigDict(extra="forbid")

    out_dir: str = Field("runs", description="Parent directory of run directories.")
    name: str | None = Field(None, description="Run directory name (default: model preset and a timestamp).")
    save_weights: bool = Field(True, description="Write the final weights as model.safetensors.")
    tensorboard: bool | None = Field(
        None, description="Also write the metrics as TensorBoard event files (RUN_DIR/tb); unset: when the "
        "tensorboard package is installed (the tensorboard extra). true without it is refused.")
    wandb: typing.Literal["off", "online", "offline"] = Field(
        "off", description="Also log the metrics to Weights & Biases (the wandb extra): 'online' (an API key: "
        "`wandb login` or WANDB_API_KEY), or 'offline' into RUN_DIR/wandb, which `wandb sync` uploads later. "
        "A resume continues the same W&B run; under torchrun rank 0 logs.")
    wandb_project: str = Field("fuyou", description="The W&B project of run.wandb's run.")
    wandb_entity: str | None = Field(None, description="The W&B team or user (unset: the API key's default).")

    @field_validator("wandb", mode="before")
    @classmethod
    def _wandb_switch(cls, v):
        if isinstance(v, bool) or (isinstance(v, str) and v.lower() in ("true", "false")):  # (run.wandb=true)
            return "online" if str(v).lower() == "true" else "off"
        return v

    @field_validator("wandb_project")
    @classmethod
    def _some_project(cls, v):
        if not v.strip() or any(c in v for c in '/\\#?%:'):
            raise ValueError(f"run.wandb_project {v!r}: give a W&B project name (no '/', '\\', '#', '?', '%', ':')")
        return v

    @field_validator("out_dir")
    @classmethod
    def _some_dir(cls, v):
        if not v.strip():  # (`run.out_dir=` wrote run directories into the current one in silence: a pass)
            raise ValueError("run.out_dir is empty: give a directory (the default is runs; '.' for this one)")
        return os.path.expanduser(v)  # (--out '~/runs' made a directory named '~': a pass)

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v):
        if v is not None and (v in ("", ".", "..") or "/" in v or "\\" in v or "\0" in v):
            raise ValueError(f"run.name {v!r} must be a plain directory name (no '/', not '.' or '..'): runs live "
                             f"directly in run.out_dir")
        return v


FINE_TUNING = {
    # Full fine-tuning recipes agree on these (Stanford Alpaca's train.py recipe: lr 2e-5, no weight decay,
    # warm-up 3 % of the steps, cosine decay to zero; TRL's SFTConfig: learning_rate 2e-5; transformers'
    # TrainingArguments: betas (0.9, 0.999), weight_decay 0, max_grad_norm 1.0), unlike pretraining's
    # lr 1e-3, beta2 0.95 and decay 0.1 (fuyou's defaults for a model trained from scratch).
    "optim": {"lr": 2e-5, "beta1": 0.9, "beta2": 0.999, "weight_decay": 0.0},
    "train": {"warmup_ratio": 0.03, "lr_schedule": "cosine", "min_lr_ratio": 0.0},
}


class FuyouConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: ModelConfig = Field(default_factory=lambda: ModelConfig(**preset("gpt-tiny")))
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    optim: AdamWConfig = Field(default_factory=AdamWConfig)
    lora: LoRAConfig = Field(default_factory=LoRAConfig)
    offload: OffloadConfig = Field(default_factory=OffloadConfig)
    hardware: HardwareConfig = Field(default_factory=HardwareConfig)
    run: RunConfig = Field(default_factory=RunConfig)

    @model_validator(mode="before")
    @classmethod
    def _shape_from_checkpoint(cls, data):
        """``model.init_from``: the checkpoint's shape fields win over the preset and the fields given."""
        if isinstance(data, dict) and isinstance(data.get("model"), dict) and data["model"].get("init_from"):
            from fuyou.hf.source import checkpoint_model_fields

            data = {**data, "model": checkpoint_model_fields(dict(data["model"]))}
        return data

    @model_validator(mode="after")
    def _lora_fits(self) -> "FuyouConfig":
        if self.lora.enabled:
            from fuyou.models.lora import resolve_targets

            if self.optim.master != "fp32" or self.optim.moments != "fp32":
                raise ValueError("optim.master/optim.moments store a full fine-tuning's optimizer state; with LoRA "
                                 "the adapters' state is small and kept in memory: leave them at fp32")
            try:
                resolve_targets(self.model.family, self.lora.targets)
            except ConfigError as e:
                raise ValueError(str(e)) from None
        return self

    @model_validator(mode="after")
    def _default_sequence_within_positions(self) -> "FuyouConfig":
        """A data.seq_len left at its default fits a GPT's position table (`fuyou train --model gpt-test`, a
        listed preset of 64 positions, was refused its default 128: a pass); one given is checked as given."""
        if (self.model.family == "gpt" and "seq_len" not in self.data.model_fields_set
                and self.data.seq_len > self.model.max_seq_len):
            if self.model.init_from:  # (a preset's shorter sequence is in its listing; a checkpoint's is not)
                print(f"fuyou: note: data.seq_len={self.model.max_seq_len}, the positions of model.init_from="
                      f"{self.model.init_from} (the default {self.data.seq_len} is beyond them)", file=sys.stderr)
            self.data = self.data.model_copy(update={"seq_len": self.model.max_seq_len})
        return self

    @model_validator(mode="after")
    def _fine_tuning_defaults(self) -> "FuyouConfig":
        """A run that starts from a checkpoint (``model.init_from``) fine-tunes: the optimizer and schedule
        fields the user left unset take ``FINE_TUNING`` (pretraining defaults would wreck the model), with
        a note naming them. A resumed run keeps what its config.toml says (every field set there)."""
        if not self.model.init_from:
            return self
        applied = []
        for section, values in FINE_TUNING.items():
            sub = getattr(self, section)
            unset = {k: v for k, v in values.items() if k not in sub.model_fields_set}
            if section == "train" and "warmup_steps" in sub.model_fields_set:
                unset.pop("warmup_ratio", None)
            if unset:
                setattr(self, section, sub.model_copy(update=unset))
                applied += [f"{section}.{k}={v}" for k, v in unset.items() if getattr(sub, k) != v]
        if applied:
            print(f"fuyou: note: fine-tuning defaults (model.init_from is set): {', '.join(applied)}", file=sys.stderr)
        return self

    @model_validator(mode="after")
    def _checkpoint_tokenizer(self) -> "FuyouConfig":
        """``data.tokenizer='auto'``: a model started from a checkpoint with a tokenizer reads its data
        through that tokenizer (with a note); otherwise bytes. An explicit 'byte' for such a model is
        refused: byte ids are not the model's vocabulary (``fuyou.data.batches.check_tokenizer``)."""
        if self.data.tokenizer not in ("auto", "byte"):  # a directory: absolute, as the data's paths (an export
            # read a relative one from its own working directory: a review)
            given = Path(self.data.tokenizer).expanduser()
            if not given.is_absolute():
                self.data = self.data.model_copy(update={"tokenizer": str(given.absolute())})
            return self
        if self.data.source not in ("builtin", "text"):
            return self
        tok = None
        if self.model.init_from:
            from fuyou.hf.source import hf_files_dir, tokenizer_dir

            tok = tokenizer_dir(self.model.init_from)
            hf = hf_files_dir(self.model.init_from)
            if tok is None and hf is not None and self.data.tokenizer == "auto" and not _byte_model(hf):
                raise ValueError(f"model.init_from={self.model.init_from} is a Hugging Face checkpoint without tokenizer "
                                 f"files in {hf} (tokenizer.json, tokenizer.model, ...), and its vocabulary is not "
                                 f"bytes: give data.tokenizer=DIR (the model's tokenizer, for example copied from "
                                 f"the model's original repository), or data.tokenizer=byte to train it on byte ids "
                                 f"anyway")
        if tok is not None and self.data.tokenizer == "byte":
            raise ValueError(f"data.tokenizer='byte' but model.init_from={self.model.init_from} was trained with the "
                             f"tokenizer in {tok}; leave data.tokenizer at 'auto' (that tokenizer) or name it")
        if self.data.tokenizer == "auto":
            if tok is not None:
                print(f"fuyou: note: data.tokenizer={tok} (the tokenizer of model.init_from)", file=sys.stderr)
            self.data = self.data.model_copy(update={"tokenizer": str(tok) if tok is not None else "byte"})
        return self


def _byte_model(hf_dir) -> bool:
    """A ``fuyou export`` of a model trained on byte ids records it in its config.json (``hf.export.BYTE_MARK``):
    its data is read as bytes again (a round trip was refused for want of tokenizer files: a pass)."""
    import json

    from fuyou.hf.export import BYTE_MARK

    try:
        return json.loads((hf_dir / "config.json").read_text()).get(BYTE_MARK) == "byte"
    except (OSError, ValueError, AttributeError):
        return False


SECTIONS = {name: f.annotation for name, f in FuyouConfig.model_fields.items()}


# What a resumed run may change. The committed state's shape and where it lives are fixed by the
# model, the SSD directories, the state format (optim.master, optim.moments), the compute precision (the
# stored compute weights are in it) and the adapters' shape and scale (lora.*, except dropout); everything
# else (steps, learning rate and the rest of the optimizer, data, logging, budgets, schedules) may change and
# is recorded (fuyou.train.run.resume_changes); the batch (``DATA_POSITION``) may not.
FIXED_ON_RESUME = ("model.", "offload.mode", "offload.commit", "optim.master", "optim.moments",
                   "train.precision",
                   "lora.rank", "lora.alpha", "lora.targets", "lora.use_rslora", "lora.init",
                   "lora.base")  # lora.dropout may change
# offload.ssd_dirs may change: directories moved elsewhere (each store directory's marker names its store
# and place, so a foreign or reordered one is refused when the state is opened)
NOT_COMPARED = ("model.init_from", "run.")
# The data position (rows consumed) is the committed step times these: fixed too
DATA_POSITION = ("train.grad_accum", "train.micro_batch_size", "data.seq_len")
# Which rows the data makes, their order and the held-out set: fixed as well (a new-user pass changed train.seed
# and data.packing on resume: examples of the epoch under way were skipped or repeated, and data.val_fraction put
# examples trained on into the held-out set, each only listed as a change)
DATA_ORDER = ("train.seed", "data.packing", "data.val_fraction", "data.format", "data.jsonl_field",
              "data.train_on_prompt")  # (a pass: conversations without an assistant turn came back into the data)


def orders_rows(key: str, *cfgs: "FuyouConfig") -> bool:
    """Whether ``DATA_ORDER``'s ``key`` decides the rows of the data of any of ``cfgs`` (a run's saved and
    resumed configs): a setting the data does not read is no change to refuse (the review: data.val_fraction
    beside data.eval_path, data.format for prepared or synthetic data)."""
    if key == "data.val_fraction":
        return any(not c.data.eval_path and c.data.source != "synthetic" for c in cfgs)
    if key in ("data.format", "data.jsonl_field"):
        return any(c.data.source == "text" and _records(c.data.path) for c in cfgs)
    if key in ("data.packing", "data.train_on_prompt"):
        return any(c.data.source == "prepared" or c.data.source == "text" and _records(c.data.path) for c in cfgs)
    return True


def _records(paths) -> bool:
    """Whether text data at ``paths`` may hold JSON-lines records (a directory may; plain-text files do not):
    plain text reads none of the records' settings (a pass was refused data.packing on a .txt run)."""
    return any(not str(p).lower().endswith((".txt", ".md", ".text", ".rst")) for p in paths)


def flat_settings(cfg: FuyouConfig) -> dict[str, Any]:
    """Every setting by its dotted key ("train.grad_accum": 4, ...)."""
    return {f"{sec}.{k}": v for sec, vals in cfg.model_dump().items() for k, v in vals.items()}


def fixed_settings(cfg: FuyouConfig) -> dict[str, Any]:
    """The settings a resume may not change (``FIXED_ON_RESUME``, ``DATA_POSITION``, ``DATA_ORDER``), as JSON
    values: the commit record keeps them, so a resume compares with what was committed, not only with config.toml
    (which the user may have edited: a new-user pass resumed at another batch size that way, in silence)."""
    return json.loads(json.dumps({k: v for k, v in flat_settings(cfg).items()
                                  if (k.startswith(FIXED_ON_RESUME) or k in DATA_POSITION or k in DATA_ORDER)
                                  and not k.startswith(NOT_COMPARED)}, default=str))


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, flags: dict | None = None) -> FuyouConfig:
    """Build and validate a config from a TOML file, flag values (``{"offload.ssd_dirs": [...]}``)
    and ``key=value`` strings. Raises ``ConfigError`` with one sentence per problem."""
    raw: dict[str, dict[str, Any]] = {}
    if path is not None:
        p = Path(path).expanduser()
        if p.is_dir():
            raise ConfigError(f"config file {p} is a directory; give the TOML file itself (see configs/ for examples)")
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist; see configs/ for examples")
        raw = read_toml(p)
    given = set()
    for key, value in (flags or {}).items():
        _set(raw, key, value)
        given.add(key)
    for item in overrides or []:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form section.key=value (e.g. train.steps=100)")
        value = _parse_value(text.strip())
        if not isinstance(value, str) and _text_field(key.strip()):  # (run.name=nan was the float nan: a pass)
            value = text.strip()
        _set(raw, key.strip(), value)
        given.add(key.strip())
    if path is not None and isinstance(raw.get("train"), dict):  # (a value unset on the command line gives no way)
        _give_way(raw["train"], {k.partition(".")[2] for k in given if k.startswith("train.")
                                 and raw["train"].get(k.partition(".")[2]) not in (None, "none")})
    return validate(raw)


#: settings of which one (steps, epochs) or two (global_batch, micro_batch_size, grad_accum) are given: those
#: given on the command line take the place of the file's, which give way in this order
TIED = (("steps", "epochs"), ("grad_accum", "micro_batch_size", "global_batch"))


def _give_way(train: dict, given: set[str]) -> None:
    """The file's train.steps gives way to an epochs given on the command line (and the reverse), and its
    batch settings to those given (two of global_batch, micro_batch_size, grad_accum are kept). A new-user
    pass: `--config RUN/config.toml train.epochs=1` was refused as "steps and epochs both given", and
    train.steps=none is no number."""
    steps, batch = TIED
    if given & set(steps):
        for k in steps:
            if k not in given and train.get(k) not in (None, "none"):
                del train[k]
    # one way: a warmup_steps given replaces the file's warmup_ratio, which would override it (it was ignored, and a
    # resume said it was changed: a pass); a warmup_ratio given overrides the file's warmup_steps as it is
    if "warmup_steps" in given and "warmup_ratio" not in given:
        train.pop("warmup_ratio", None)
    if given & set(batch):
        for k in batch:
            set_now = [b for b in batch if train.get(b) not in (None, "none")]
            if len(set_now) > 2 and k not in given and k in set_now:
                del train[k]


def validate(raw: dict[str, Any]) -> FuyouConfig:
    validate_keys(raw, whole=True)
    model = dict(raw.get("model", {}))
    if model.get("preset") is not None:
        model = {**preset(str(model["preset"])), **model}
    elif "model" not in raw:
        model = preset("gpt-tiny")
    try:
        return FuyouConfig.model_validate({**raw, "model": model})
    except ValidationError as e:
        raise ConfigError(explain(e)) from None


def validate_keys(raw: dict[str, Any], whole: bool = False) -> None:
    """Refuse a config's unknown sections and keys, keys set outside any section and implicit conversions
    (``refuse_implicit``); "none" unsets a field that may be unset (in place). ``whole``: the config is validated
    whole next, whose report names every unknown key."""
    for section, values in raw.items():
        if not isinstance(values, dict):  # a key written above every [section] of the file
            home = [name for name, sec in SECTIONS.items() if section in sec.model_fields]
            where = f"under [{home[0]}]" if home else f"under its section ({', '.join(SECTIONS)})"
            raise ConfigError(f"{section!r} is set outside any section of the config file; write it {where} "
                              f"(e.g. [{home[0] if home else 'train'}] followed by {section} = ...)")
        if section not in SECTIONS:
            raise ConfigError(f"unknown section [{section}]{_did_you_mean(section, SECTIONS)}; the sections are: "
                              f"{', '.join(SECTIONS)}")
        fields = SECTIONS[section].model_fields
        for key, value in values.items():  # "none" unsets a field that may be unset
            if isinstance(value, str) and value.lower() in ("none", "null") and key in fields \
                    and type(None) in typing.get_args(fields[key].annotation):
                values[key] = None
            else:
                refuse_implicit(SECTIONS[section], section, key, value)
        unknown = [k for k in values if k not in fields]
        if unknown and not whole:  # (validate's own are pydantic's: explain says them all)
            raise ConfigError(f"unknown key '{section}.{unknown[0]}'{_did_you_mean(unknown[0], fields)}; allowed "
                              f"keys here: {', '.join(fields)}")


def explain(err: ValidationError, section: str | None = None) -> str:
    """Turn pydantic's report into sentences a user can act on. ``section``: the error is of that
    section's model alone (``fuyou plan`` validates sections one by one)."""
    lines = []
    for e in err.errors():
        if section is not None:
            e = {**e, "loc": (section, *e["loc"])}
        loc = ".".join(str(x) for x in e["loc"])
        if e["type"] == "extra_forbidden":
            cls = SECTIONS.get(str(e["loc"][0]))
            names = list(cls.model_fields) if cls and len(e["loc"]) == 2 else list(SECTIONS)
            lines.append(f"unknown key {loc!r}{_did_you_mean(str(e['loc'][-1]), names)}; allowed keys here: "
                         f"{', '.join(names)}")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            got = (f" (got {e['input']!r})" if "input" in e and not isinstance(e["input"], dict)
                   and f"got {e['input']!r}" not in msg and f"got {e['input']}" not in msg else "")  # (not twice)
            lines.append(f"{loc}: {msg}{got}" if loc else f"{msg}{got}")  # a whole-config check has no place
    return "invalid configuration:\n  " + "\n  ".join(lines)


def refuse_implicit(cls, section: str, key: str, value: Any) -> None:
    """pydantic reads "no", "off" and 0 as false and "16" as 16: the implicit conversions TOML's typed values
    avoid, refused for the plain boolean and number fields (those with a parser of their own, sizes and
    times, take strings)."""
    f = cls.model_fields.get(key)
    if f is None:
        return
    parsed = {name for v in cls.__pydantic_decorators__.field_validators.values() for name in v.info.fields}
    if key in parsed:
        return
    if f.annotation is bool and not isinstance(value, bool):
        raise ConfigError(f"{section}.{key} is true or false (TOML's, unquoted); got {value!r}")
    if f.annotation in (int, float) and isinstance(value, (str, bool)):
        raise ConfigError(f"{section}.{key} is a number (unquoted); got {value!r}")


def _did_you_mean(name: str, names) -> str:
    import difflib

    close = difflib.get_close_matches(name, list(names), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _set(raw: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    if len(parts) != 2:
        raise ConfigError(f"key {dotted!r} must be section.key (sections: {', '.join(SECTIONS)})")
    raw.setdefault(parts[0], {})
    if not isinstance(raw[parts[0]], dict):
        raise ConfigError(f"[{parts[0]}] must be a table")
    raw[parts[0]][parts[1]] = value


def user_path(path: str | Path) -> Path:
    """A path as a user means it, and as config.toml records it: ~ expanded, absolute, symlinks kept, and
    normalised (".", ".."; "CWD/../ssd" named a directory that may go: a pass) unless a symlink before a ".."
    makes the text's parent another directory than the link's."""
    p = os.path.expanduser(str(path))
    norm = os.path.abspath(p)
    return Path(norm if os.path.realpath(norm) == os.path.realpath(p) else Path(p).absolute())


def given_run_dir(path: str | Path) -> Path:
    """A run directory as given to --resume or export: ``user_path``, and a symlink to it followed, since its
    SSD state is named after the directory itself (`--resume .` looked for ".fuyou-state", and a link of another
    name was told the run had been renamed: a pass)."""
    p = user_path(path)
    return p.resolve() if p.is_symlink() else p


def _text_field(dotted: str) -> bool:
    """Whether ``section.key`` is a field of text only (a name, a path): a value written for it is its text."""
    section, _, name = dotted.partition(".")
    field = getattr(SECTIONS.get(section), "model_fields", {}).get(name)
    if field is None:
        return False
    ann = field.annotation
    union = typing.get_origin(ann) in (typing.Union, types.UnionType)  # (not list[str]: a list is no text)
    return ann is str or (union and set(typing.get_args(ann)) <= {str, type(None)})


def _parse_value(text: str) -> Any:
    """TOML literal if it parses (numbers, booleans, lists, quoted strings), else the bare string.
    ('none' stays a string: it is a value of some fields, and unsets optional ones, see ``validate``.)"""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        pass
    if text.startswith("[") and text.endswith("]") and "[" not in text[1:-1]:
        # a list of bare words (offload.ssd_dirs=[/nvme0,/nvme1], as lora.targets=[q_proj,v_proj] is written):
        # each item as a value of its own, not the whole as one path '[/nvme0,/nvme1]' (a hostile pass)
        return [_parse_value(t.strip()) for t in text[1:-1].split(",") if t.strip()]
    try:  # a number TOML spells otherwise (.0001, 5.): a number all the same, as a user means it
        return float(text) if any(c.isdigit() for c in text) and text.lower() not in ("nan", "inf") else text
    except ValueError:
        return text


_PATH_LISTS = {"data": ("path", "eval_path"), "offload": ("ssd_dirs",)}


def to_toml(cfg: FuyouConfig, omit: frozenset[str] = frozenset()) -> str:
    """The resolved config as TOML. TOML has no null: an unset field whose default is also unset is
    omitted; one whose default is set (``grad_clip``) is written as the string "none". ``omit``:
    "section.key" names left out (their defaults, or what other settings imply, apply when it is read)."""
    out = ["# fuyou resolved configuration: `fuyou train --config THIS_FILE` repeats the run"]
    for section, values in cfg.model_dump().items():
        for name in omit:
            if name.startswith(section + "."):
                values.pop(name[len(section) + 1:], None)
        out.append(f"\n[{section}]")
        fields = SECTIONS[section].model_fields
        if section == "train" and values.get("epochs") is not None:
            values.pop("steps")  # derived from the epochs and the data
        for key in _PATH_LISTS.get(section, ()):  # absolute: a resume from another directory finds them
            if values.get(key):
                values[key] = [str(user_path(x)) for x in values[key]]
        for k, v in values.items():
            if v is not None:
                out.append(f"{k} = {_toml_value(v)}")
            elif fields[k].default is not None:
                out.append(f'{k} = "none"')
    return "\n".join(out) + "\n"


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):  # an inline table (model.rope_scaling)
        return "{" + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items() if x is not None) + "}"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")
