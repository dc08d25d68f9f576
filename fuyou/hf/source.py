"""``model.init_from``: what a path holds, the model shape it implies, and where its tokenizer is.

Two kinds of source:

- a **Hugging Face model directory**: ``config.json``, ``*.safetensors`` (optionally sharded with
  ``model.safetensors.index.json``) and tokenizer files;
- a **fuyou run directory**: ``config.toml`` and ``model.safetensors`` in fuyou's names, as written
  at the end of training or by ``fuyou import`` (which also keeps the source's small files, config
  and tokenizer, in ``hf/``).

A fuyou run started from another one records it in ``model.init_from``, so the Hugging Face files of
a run are found by following that chain (``hf_files_dir``); export and the tokenizer use them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

from fuyou.data.config import is_prepared
from fuyou.errors import ConfigError
from fuyou.snapshots import snapshot_dirs
from fuyou.tomlfile import read_toml
from fuyou.hf.config_map import SHAPE_FIELDS, SUPPORTED_TEXT, to_fuyou
from fuyou.hf.weights import WEIGHT_SUFFIXES, FuyouWeights, HFWeights, in_model, model_roots

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
HF_META = "hf"  # the subdirectory of a fuyou run directory holding the source's config and tokenizer


#: Hugging Face config fields of dropout in the model (GPT-2's; Llama's, Qwen's and Mistral's)
DROPOUT_FIELDS = ("resid_pdrop", "embd_pdrop", "attn_pdrop", "attention_dropout")


class Checkpoint:
    """A resolved ``init_from``: the model fields it fixes and a reader of its weights."""

    def __init__(self, path: Path, fields: dict[str, Any], weights: HFWeights | FuyouWeights,
                 hf: dict[str, Any] | None = None):
        self.path, self.fields, self.weights, self.hf = path, fields, weights, hf

    def note_untrained(self) -> None:
        """A note on stderr of what a Hugging Face config asks for that fuyou's training leaves out: dropout
        (GPT-2's configs carry 0.1 of each; fuyou trained without it, and said nothing: a pass)."""
        drops = {k: v for k, v in (self.hf or {}).items() if k in DROPOUT_FIELDS and isinstance(v, (int, float))
                 and not isinstance(v, bool) and v > 0}
        if drops and os.environ.get("RANK", "0") == "0":  # (once, not on every torchrun rank: a review)
            given = ", ".join(f"{k}={v}" for k, v in drops.items())
            print(f"fuyou: note: {self.path / 'config.json'} sets dropout ({given}); fuyou trains without dropout "
                  f"in the model (lora.dropout is the adapters'), as is usual for fine-tuning", file=sys.stderr)

    def init_values(self, stage):
        """``init_values(stage) -> {global key: fp32 tensor}`` for the trainers."""
        return self.weights.init_values(stage)

    def check(self, model) -> None:
        """A Hugging Face checkpoint's weights are all the model's (``ModelConfig`` ``model``), read before
        any is converted or trained (``HFWeights.check_fits``)."""
        if isinstance(self.weights, HFWeights):
            from fuyou.models import StageModel

            self.weights.check_fits(StageModel(model).param_specs(), model.tie_embeddings, self.path / "config.json")


def lora_run(p: Path) -> bool:
    """A fuyou run directory of LoRA adapters (adapter.safetensors, or lora.rank in its config.toml; a
    stopped one may have no adapter file yet)."""
    if (p / "adapter.safetensors").is_file():
        return True
    try:
        return bool(read_toml(p / "config.toml").get("lora", {}).get("rank"))
    except (OSError, ValueError):
        return False


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Resolve ``path`` (see the module docstring) or raise a ConfigError saying what is missing."""
    p = Path(path).expanduser()
    expected = ("give a local Hugging Face model directory (config.json, *.safetensors, tokenizer files) or a "
                "fuyou run directory (config.toml, model.safetensors)")
    if not p.exists():
        raise ConfigError(f"{p} does not exist; {expected}")
    if not p.is_dir():
        raise ConfigError(f"{p} is not a directory; {expected}")
    if (p / "adapter_config.json").is_file() and not (p / "config.json").is_file():
        raise ConfigError(f"{p} is a PEFT adapter (adapter_config.json), not a model: give its base model as "
                          f"--init-from and the adapter as lora.init_from={p}")
    if (p / "config.json").is_file():
        hf = read_json(p / "config.json")
        fields = to_fuyou(hf, str(p / "config.json"))
        return Checkpoint(p, fields, HFWeights(p, fields["family"]), hf)
    if (p / "model.safetensors").is_file():
        w = FuyouWeights(p / "model.safetensors")
        return Checkpoint(p, {k: w.model[k] for k in SHAPE_FIELDS if k in w.model}, w)
    if (p / "config.toml").is_file() and not (p / "model.safetensors").is_file() and lora_run(p):
        raise ConfigError(f"{p} is a LoRA run: it holds adapters, not a model. Give its base model as --init-from "
                          f"and its adapter as lora.init_from=DIR (`fuyou export {p} --out DIR`), or export it "
                          f"merged (`fuyou export {p} --out DIR --merge`) and give --init-from DIR")
    if is_prepared(p):  # (its .bin files: "has weights but no config.json")
        raise ConfigError(f"{p} is prepared data (`fuyou data prepare`), not a model: give it as data.path={p}, and a "
                          f"model with --init-from (or a preset)")
    if any(f.suffix in WEIGHT_SUFFIXES for f in p.iterdir()):
        raise ConfigError(f"{p} has weights but no config.json; a Hugging Face model directory needs its "
                          f"config.json (fuyou imports {SUPPORTED_TEXT})")
    if (p / "config.toml").is_file():  # (a pass was told it "holds no model")
        snaps = snapshot_dirs(p / "snapshots")
        raise ConfigError(f"{p} is a fuyou run without model.safetensors: it was stopped, is still training, or ran "
                          f"with run.save_weights=false. "
                          + (f"Give one of its snapshots (the last: {snaps[-1]}), or export" if snaps else "Export")
                          + f" its last commit (an SSD-offloaded run's: `fuyou export {p} --out DIR`) and give "
                            f"--init-from DIR")
    raise ConfigError(f"{p} holds no model; {expected}")


def model_shape(path: str | Path) -> dict[str, Any]:
    """A model's shape fields from ``path`` without needing its weights (``fuyou plan --model PATH``): a
    Hugging Face ``config.json`` or its directory, or a fuyou run directory (its ``config.toml``'s
    ``[model]``, else the header of its ``model.safetensors``)."""
    p = Path(path).expanduser()
    if p.is_file() and p.suffix == ".json":
        return to_fuyou(read_json(p), str(p))
    if p.is_dir() and (p / "config.json").is_file():
        return to_fuyou(read_json(p / "config.json"), str(p / "config.json"))
    if p.is_dir() and (p / "config.toml").is_file():
        try:
            model = _run_model_section(p)
        except OSError as e:  # (a ConfigError names the file itself)
            raise ConfigError(f"{p / 'config.toml'} cannot be read: {e}") from None
        return {k: model[k] for k in SHAPE_FIELDS if k in model}
    if p.is_dir() and (p / "model.safetensors").is_file():
        w = FuyouWeights(p / "model.safetensors")
        return {k: w.model[k] for k in SHAPE_FIELDS if k in w.model}
    raise ConfigError(f"{p} is neither a model preset nor a model: give a preset (`fuyou models`), a Hugging Face "
                      f"config.json or model directory, or a fuyou run directory")


def checkpoint_model_fields(data: dict[str, Any]) -> dict[str, Any]:
    """``FuyouConfig``'s before-validator: the checkpoint's shape fields win over the preset and the
    fields given; a note on stderr lists the values that changed."""
    path = Path(data["init_from"]).expanduser().resolve()
    ckpt = open_checkpoint(path)
    ckpt.note_untrained()
    fields = ckpt.fields
    changed = [f"{k} {data[k]!r} -> {v!r}" for k, v in fields.items() if k in data and data[k] != v]
    if data.get("preset"):
        changed.insert(0, f"preset {data['preset']!r} ignored")
    if changed:
        print(f"fuyou: note: model.init_from={path} sets the model's shape: {', '.join(changed)}", file=sys.stderr)
    return {**data, **fields, "preset": None, "init_from": str(path)}


def _run_model_section(run_dir: Path) -> dict[str, Any]:
    """The ``[model]`` section of a fuyou run directory's ``config.toml`` (raises what reading and
    parsing raise)."""
    return read_toml(run_dir / "config.toml").get("model", {})


def snapshot_run(path: Path) -> Path | None:
    """The run directory a snapshot (``RUN/snapshots/step-N``, also ``abandoned-step-N``) lies in; None if
    ``path`` is no snapshot inside a run. A snapshot's config.toml names its run by the path the run had
    when the snapshot was taken: after the run moved, that path may be gone or be another run's (a new-user
    pass exported a moved run's snapshot with the tokenizer of a new run of the same name)."""
    run = path.parent.parent
    if path.parent.name == "snapshots" and re.fullmatch(r"(abandoned-(\d+-)?)?step-\d+", path.name) \
            and (run / "config.toml").is_file():
        return run
    return None


def hf_files_dir(path: str | Path, _depth: int = 0) -> Path | None:
    """The directory with the Hugging Face config and tokenizer files behind ``path``, if any."""
    p = Path(path).expanduser()
    if (p / "config.json").is_file():
        return p
    if (p / HF_META / "config.json").is_file():
        return p / HF_META
    if (p / "config.toml").is_file() and _depth < 16:
        try:
            parent = snapshot_run(p) or _run_model_section(p).get("init_from")
        except (ConfigError, OSError):
            return None
        if parent and Path(parent).resolve() != p.resolve():
            return hf_files_dir(parent, _depth + 1)
    return None


def tokenizer_dir(path: str | Path) -> Path | None:
    """The Hugging Face tokenizer behind ``path`` (see ``hf_files_dir``), if it has one."""
    d = hf_files_dir(path)
    return d if d is not None and any((d / f).is_file() for f in TOKENIZER_FILES) else None


def copy_small_files(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> list[str]:
    """Copy every file of ``src`` that is not a weight file (config, tokenizer, generation config,
    licence, chat template) into ``dst``; return their names. A symlink that leads out of the model's
    files (``model_roots``: the directory, or a cache snapshot's blobs) is skipped (with a warning):
    nothing else is copied into run or export directories."""
    dst.mkdir(parents=True, exist_ok=True)
    names = []
    roots = model_roots(src)
    for f in sorted(src.iterdir()):
        if not in_model(f, roots):
            print(f"fuyou: skipping {f}: a symlink out of the model directory ({f.resolve()})", file=sys.stderr)
            continue
        if f.is_file() and f.suffix not in WEIGHT_SUFFIXES and not f.name.endswith(".index.json") \
                and f.name not in skip:
            size = f.stat().st_size
            if size > SMALL_FILE:  # another framework's weights under a name not listed
                print(f"fuyou: not copying {f.name} ({size / 2**20:.0f} MiB): a config or tokenizer file "
                      f"is smaller than {SMALL_FILE // 2**20} MiB", file=sys.stderr)
                continue
            shutil.copy2(f, dst / f.name)
            names.append(f.name)
    return names


SMALL_FILE = 256 * 2**20  # the largest config or tokenizer file copied (tokenizer.json: ~10-35 MB for 128-256K vocabularies)


def read_json(path: Path) -> dict[str, Any]:
    try:
        out = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {path} as JSON: {e}") from e
    if not isinstance(out, dict):
        raise ConfigError(f"{path} is not a JSON object; is it a Hugging Face config.json?")
    return out


# The files a Hugging Face tokenizer is made of (a chat template may be a file of its own, which transformers
# prefers to tokenizer_config.json's): what an export replaces with the data's tokenizer (``data_tokenizer``)
TOKENIZER_PARTS = ("tokenizer*", "vocab*", "merges.txt", "*.model", "*.tiktoken", "special_tokens_map.json",
                   "added_tokens.json", "chat_template*")


def _tokenizer_parts(d: Path) -> dict[str, Path]:
    return {f.name: f for pattern in TOKENIZER_PARTS for f in sorted(d.glob(pattern)) if f.is_file()}


def data_tokenizer(run: Path, model_dir: Path | None) -> tuple[Path | None, str | None]:
    """The Hugging Face tokenizer a run (or snapshot) tokenized its data with where it is not the model's own
    in ``model_dir`` (data.tokenizer=DIR, or prepared data's, as its meta.json records it): ``(dir, None)``;
    ``(None, name)`` when that tokenizer is gone; ``(None, None)`` when the data took the model's tokenizer (or
    bytes), or one made of the same files. An export shipped the base's tokenizer beside a model trained on
    another's chat template, or none for a base without one trained with data.tokenizer=DIR (a pass)."""
    try:
        raw = read_toml(run / "config.toml")
    except (OSError, ConfigError):
        return None, None
    data, model = raw.get("data", {}), raw.get("model", {})
    spec = data.get("tokenizer", "auto") if isinstance(data, dict) else "auto"
    paths = data.get("path") if isinstance(data, dict) else None
    paths = [paths] if isinstance(paths, str) else paths or []
    if spec in ("auto", "byte") and paths and data.get("source") == "prepared":
        try:
            spec = json.loads((Path(paths[0]) / "meta.json").read_text()).get("tokenizer", "byte")
        except (OSError, ValueError, AttributeError):
            return None, None
        spec = spec.removeprefix("hf:") if isinstance(spec, str) and spec.startswith("hf:") else "byte"
    if not isinstance(spec, str) or spec in ("auto", "byte"):
        return None, None
    d = Path(spec).expanduser()
    base = model.get("init_from") if isinstance(model, dict) else None
    if isinstance(base, str) and base and (Path(base).expanduser().absolute() == d.absolute()
                                           or d.absolute().is_relative_to(Path(base).expanduser().absolute())):
        return None, None  # the model's own ('auto' resolves to it): the copy the run keeps is the one trained
    if not d.is_dir():
        return None, spec
    if model_dir is not None and d.resolve() == model_dir.resolve():
        return None, None
    theirs, ours = _tokenizer_parts(d), _tokenizer_parts(model_dir) if model_dir is not None else {}
    if ours.keys() == theirs.keys() and all(ours[k].read_bytes() == theirs[k].read_bytes() for k in ours):
        return None, None  # (a copy of the model's: the import's, say)
    return d, None


def use_data_tokenizer(run: Path, out: Path, model_dir: Path | None, written: list[str], stream=None) -> list[str]:
    """An export's tokenizer files: the data's tokenizer's (``data_tokenizer``) in place of the model's own,
    with a note; ``written``: the files copied from ``model_dir``. Returns the files written now."""
    d, gone = data_tokenizer(run, model_dir)
    if gone is not None:
        print(f"fuyou: note: the data was tokenized with {gone}, which is gone: the export carries "
              + (f"the tokenizer files of {model_dir} (the same vocabulary; check that its chat template is the one "
                 f"trained on)" if model_dir is not None and _tokenizer_parts(model_dir) else
                 "no tokenizer files; add those of that tokenizer before loading it with one"),
              file=stream or sys.stderr)
        return []
    if d is None:
        return []
    base = _tokenizer_parts(model_dir) if model_dir is not None else {}
    for name in base:  # (a chat_template.jinja of the base's would win over the data tokenizer's own template)
        if name in written:
            (out / name).unlink(missing_ok=True)
            written.remove(name)
    names = []
    for name, f in _tokenizer_parts(d).items():
        shutil.copy2(f, out / name)
        names.append(name)
    print(f"fuyou: note: the tokenizer files are those of {d}, which the data was tokenized with"
          + (f" (the base's own in {model_dir} differ)" if base else "")
          + " (load the model with them: its chat template and special tokens are the ones trained on)",
          file=stream or sys.stderr)
    _note_stop_token(d, out, stream)
    return names


RUN_CHAT_TEMPLATE = "chat_template.jinja"  # in a run directory: the chat format its conversations were rendered in


def has_chat_template(d: Path) -> bool:
    """Whether the tokenizer files in ``d`` carry a chat template (a chat_template.jinja, or tokenizer_config.json's
    chat_template, which older transformers read)."""
    if (d / "chat_template.jinja").is_file() or (d / "chat_template.json").is_file():
        return True
    try:
        return bool(json.loads((d / "tokenizer_config.json").read_text()).get("chat_template"))
    except (OSError, ValueError, AttributeError):
        return False


def use_run_chat_template(run: Path, out: Path, stream=None) -> list[str]:
    """An export's chat template where the run's conversations were rendered in fuyou's fallback format (its
    tokenizer had none: ``fuyou.data.formats.fallback_chat_template``, kept in the run directory): written as
    the model's, beside tokenizer files that carry none, so that ``apply_chat_template`` prompts the model with the
    tokens it was trained on (a new-user pass: the export had no template, and the note said its chat template was
    the one trained on). Returns the files written."""
    run = Path(run)
    kept = next((d / RUN_CHAT_TEMPLATE for d in (run, snapshot_run(run)) if d is not None
                 and (d / RUN_CHAT_TEMPLATE).is_file()), None)
    if kept is None or has_chat_template(out):
        return []
    template = kept.read_text()
    (out / "chat_template.jinja").write_text(template)
    config = out / "tokenizer_config.json"
    try:  # (older transformers read the template there only)
        tc = json.loads(config.read_text())
        if isinstance(tc, dict):
            config.write_text(json.dumps({**tc, "chat_template": template}, indent=2, ensure_ascii=False) + "\n")
    except (OSError, ValueError):
        pass
    print("fuyou: note: the run's conversations were rendered in fuyou's ChatML-style fallback format (its tokenizer "
          "has no chat template): the export carries it as its chat template (chat_template.jinja), so "
          "apply_chat_template prompts the model as it was trained", file=stream or sys.stderr)
    return ["chat_template.jinja"]


def _note_stop_token(tok_dir: Path, out: Path, stream=None) -> None:
    """The data tokenizer's EOS (the token its answers end with) against the stop tokens the exported
    generation_config.json names (the base's): generate() would not stop where the model learnt to (a review)."""
    from fuyou.data.tokenizer import HFTokenizer, generation_stops
    from fuyou.errors import DataError

    stops = generation_stops(out)
    if not stops:
        return

    try:
        eos = HFTokenizer(tok_dir).eos_id
    except DataError:  # (without transformers: not checked)
        return
    if eos not in stops:
        print(f"fuyou: note: the data's tokenizer ends answers with its EOS token (id {eos}), which the exported "
              f"generation_config.json does not stop on (eos_token_id {sorted(stops)}): add {eos} to its "
              f"eos_token_id so that generate() stops where the model learnt to", file=stream or sys.stderr)
