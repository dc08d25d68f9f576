"""Checkpoint weights, read one tensor at a time: fuyou's names <-> Hugging Face's, and two readers.

``hf_name(key, family)`` maps a fuyou parameter (``"block.3.q.weight"``) to its Hugging Face name
(``"model.layers.3.self_attn.q_proj.weight"``) and says whether the layout is transposed: GPT-2 keeps
its matmul weights as ``Conv1D`` (in x out), fuyou as ``nn.Linear`` (out x in). GPT-2's ``c_attn`` is
already q|k|v by rows after the transpose, as fuyou's ``qkv``. Llama checkpoints in transformers'
format hold Q/K in the half-split RoPE layout fuyou uses, so they are copied as they are. Every
name maps one-to-one, whatever the head width: Q is (n_head * head_dim, d_model) and O its transpose's
shape on both sides, Qwen3's per-head q/k norms are (head_dim,), and a tied LM head is no tensor of
its own (fuyou shares ``embed.wte``; transformers ties ``lm_head.weight`` to the embedding on load).

Readers memory-map the safetensors files (``safe_open``) and copy out one tensor per call, so reading
a model costs about one tensor of memory beyond what the caller keeps (the engine keeps one stage).
"""

from __future__ import annotations

import json
import math
import os
import socket
import struct
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor

from fuyou.errors import ConfigError, DataError
from fuyou.store.shared import process_gone
from fuyou.store.layout import fsync_dir

_LLAMA_BLOCK = {
    "attn_norm.weight": "input_layernorm.weight",
    "q.weight": "self_attn.q_proj.weight", "q.bias": "self_attn.q_proj.bias",
    "k.weight": "self_attn.k_proj.weight", "k.bias": "self_attn.k_proj.bias",
    "v.weight": "self_attn.v_proj.weight", "v.bias": "self_attn.v_proj.bias",
    "q_norm.weight": "self_attn.q_norm.weight", "k_norm.weight": "self_attn.k_norm.weight",  # Qwen3
    "o.weight": "self_attn.o_proj.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "gate.weight": "mlp.gate_proj.weight", "up.weight": "mlp.up_proj.weight", "down.weight": "mlp.down_proj.weight",
}
_LLAMA_TOP = {"embed.wte": "model.embed_tokens.weight", "head.norm.weight": "model.norm.weight",
              "head.lm_head.weight": "lm_head.weight"}
_GPT_BLOCK = {
    "ln1.weight": "ln_1.weight", "ln1.bias": "ln_1.bias",
    "qkv.weight": "attn.c_attn.weight", "qkv.bias": "attn.c_attn.bias",
    "proj.weight": "attn.c_proj.weight", "proj.bias": "attn.c_proj.bias",
    "ln2.weight": "ln_2.weight", "ln2.bias": "ln_2.bias",
    "fc1.weight": "mlp.c_fc.weight", "fc1.bias": "mlp.c_fc.bias",
    "fc2.weight": "mlp.c_proj.weight", "fc2.bias": "mlp.c_proj.bias",
}
_GPT_TOP = {"embed.wte": "transformer.wte.weight", "embed.wpe": "transformer.wpe.weight",
            "head.norm.weight": "transformer.ln_f.weight", "head.norm.bias": "transformer.ln_f.bias",
            "head.lm_head.weight": "lm_head.weight"}
_GPT_CONV1D = {"qkv.weight", "proj.weight", "fc1.weight", "fc2.weight"}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx", ".onnx_data",
                   ".ot", ".tflite", ".mlmodel", ".npz")


def hf_name(key: str, family: str) -> tuple[str, bool]:
    """(Hugging Face name, transposed?) of fuyou parameter ``key``."""
    stage, _, rest = key.partition(".")
    if stage == "block":
        layer, _, local = rest.partition(".")
        if family == "gpt":
            return f"transformer.h.{layer}.{_GPT_BLOCK[local]}", local in _GPT_CONV1D
        return f"model.layers.{layer}.{_LLAMA_BLOCK[local]}", False
    return (_GPT_TOP if family == "gpt" else _LLAMA_TOP)[key], False


# Saved by some versions of transformers beside the weights; not parameters
_BUFFERS = (".rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")


def _get(file: Path, name: str) -> Tensor:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            return f.get_tensor(name)
    except (SafetensorError, OSError) as e:
        raise DataError(f"cannot read tensor {name!r} from {file}: {e}; the file may be truncated or corrupt") from e


def _equal(file_a: Path, name_a: str, file_b: Path, name_b: str, block: int = 32 << 20) -> bool:
    """Whether two stored tensors are equal, compared ``block`` bytes of rows at a time (a tied head of 128K x
    3072 bf16 is 0.8 GB: two whole copies were held outside offload.cpu_mem, on every rank)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file_a), framework="pt") as fa, safe_open(str(file_b), framework="pt") as fb:
            sa, sb = fa.get_slice(name_a), fb.get_slice(name_b)
            shape = list(sa.get_shape())
            if shape != list(sb.get_shape()) or sa.get_dtype() != sb.get_dtype():
                return False
            if not shape:
                return torch.equal(fa.get_tensor(name_a), fb.get_tensor(name_b))
            row = max(1, math.prod(shape[1:]) * 4)  # (4 bytes an element bounds every dtype read here)
            step = max(1, block // row)
            return all(torch.equal(sa[a:a + step], sb[a:a + step]) for a in range(0, shape[0], step))
    except (SafetensorError, OSError) as e:
        raise DataError(f"cannot read {name_a!r} from {file_a} or {name_b!r} from {file_b}: {e}; the file may be "
                        f"truncated or corrupt") from e


def _shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape, from the file's header."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            return {n: tuple(f.get_slice(n).get_shape()) for n in f.keys()}
    except (SafetensorError, OSError) as e:
        raise DataError(f"cannot read {file} as safetensors: {e}; the file may be truncated or corrupt") from e


def _keys(file: Path) -> tuple[list[str], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            return list(f.keys()), f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise DataError(f"cannot read {file} as safetensors: {e}; the file may be truncated or corrupt") from e


class _Reader:
    """Shared by both checkpoint kinds: ``tensor`` and ``init_values`` over a key -> file index."""

    index: dict[str, Path]
    family: str

    def _locate(self, key: str) -> tuple[Path, str, bool]:
        raise NotImplementedError

    def tensor(self, key: str, shape: tuple[int, ...]) -> Tensor:
        """fuyou parameter ``key`` as a contiguous fp32 tensor of ``shape`` (checked)."""
        file, name, transposed = self._locate(key)
        t = _get(file, name)
        if transposed:
            t = t.t()
        if tuple(t.shape) != tuple(shape):
            raise DataError(f"{file}: tensor {name!r} has shape {tuple(t.shape)}, the model config says "
                            f"{tuple(shape)}; the weights do not belong to this config")
        return t.to(torch.float32).contiguous()

    def init_values(self, stage) -> dict[str, Tensor]:
        """The trainers' ``init_values(stage)``: the stage's owned parameters, by global key."""
        return {stage.key(local): self.tensor(stage.key(local), spec.shape) for local, spec in stage.params.items()}


def model_roots(src: Path) -> list[Path]:
    """Where the files of model directory ``src`` may lie once symlinks are followed: the directory, and,
    for a snapshot of the Hugging Face cache (``models--ORG--NAME/snapshots/REV/``, whose files are
    symlinks to ``../../blobs/HASH``; ``src`` may be a symlink to it), that repository's blobs, when they
    are a real directory (``in_model`` then takes only files directly in it)."""
    roots = [src.resolve()]
    for snap in {src.absolute(), src.resolve()}:
        blobs = snap.parent.parent / "blobs"
        if snap.parent.name == "snapshots" and blobs.is_dir() and not blobs.is_symlink():
            roots.append(blobs.resolve())
    return roots


def in_model(f: Path, roots: list[Path]) -> bool:
    """File ``f``, symlinks followed, is in the model directory (``roots[0]``, at any depth) or is a blob
    of its cache repository (directly in one of the other roots)."""
    target = f.resolve()
    return target.is_relative_to(roots[0]) or any(target.parent == r for r in roots[1:])


class HFWeights(_Reader):
    """The safetensors weights of a Hugging Face model directory (sharded or single-file)."""

    def __init__(self, path: Path, family: str):
        self.path, self.family = path, family
        index_file = path / "model.safetensors.index.json"
        if index_file.is_file():
            try:
                weight_map = json.loads(index_file.read_text())["weight_map"]
                if not isinstance(weight_map, dict):
                    raise ValueError(f"weight_map is a {type(weight_map).__name__}, not an object")
            except (ValueError, KeyError, TypeError) as e:
                raise DataError(f"{index_file} is not a safetensors index (no weight_map): {e}") from e
            self.index = {name: path / file for name, file in weight_map.items()}
            roots = model_roots(path)
            here = Path(os.path.normpath(path.absolute()))
            for f in set(self.index.values()):
                # the name must not lead out of the directory, nor the file, symlinks followed (model_roots:
                # a cache snapshot's files are its blobs)
                if not Path(os.path.normpath(f.absolute())).is_relative_to(here) or not in_model(f, roots):
                    raise ConfigError(f"{index_file} points at {f}, outside the model directory {path}; a model's "
                                      f"weights must lie in its own directory")
                if not f.is_file():
                    raise ConfigError(f"{index_file} lists {f.name}, which is missing; download the complete model")
            return
        # Without an index, transformers reads model.safetensors alone; fuyou too, and else every file, each
        # tensor in one of them (a second file with the same keys, an EMA copy, was read in its place)
        files = [path / "model.safetensors"] if (path / "model.safetensors").is_file() else sorted(path.glob("*.safetensors"))
        if not files:
            others = sorted(p.name for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES)
            hint = (f" (found only {', '.join(others[:4])}: convert them with transformers: "
                    f"AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(DIR, safe_serialization=True))"
                    if others else "")
            raise ConfigError(f"{path} has no *.safetensors weights{hint}; fuyou reads safetensors only")
        self.index = {}
        for f in files:
            for name in _keys(f)[0]:
                if name in self.index:
                    raise ConfigError(f"{path}: {self.index[name].name} and {f.name} both hold {name!r}, and no "
                                      f"model.safetensors.index.json says which file is the model's; move the other "
                                      f"files away")
                self.index[name] = f

    def check_fits(self, specs, tied: bool, config: Path) -> None:
        """The checkpoint holds every tensor the model reads (fuyou parameter specs ``specs``, by key), of its
        shape (from the files' headers), and no other, so that config.json describes these weights: a
        tensor left over means a layer, a bias or a separate head it does not mention, which would be
        dropped in silence. Known buffers (RoPE's inv_freq, GPT-2's attention masks) are not weights. A tied
        model's ``lm_head.weight`` may be there if it equals the embedding."""
        used, shapes = set(), {}
        for key, spec in specs.items():
            file, name, transposed = self._locate(key)  # a missing one, named
            used.add(name)
            if file not in shapes:  # (a truncated shard was a traceback: a pass)
                shapes[file] = _shapes(file)
            if name not in shapes[file]:  # (a KeyError traceback: a pass)
                raise DataError(f"{self.path / 'model.safetensors.index.json'} lists {name!r} in {file.name}, which "
                                f"does not hold it; the index and the weight files disagree: download the model again")
            shape = shapes[file][name][::-1] if transposed else shapes[file][name]
            if tuple(shape) != tuple(spec.shape):
                raise DataError(f"{file}: tensor {name!r} has shape {tuple(shapes[file][name])}, {config} says "
                                f"{tuple(spec.shape)[::-1] if transposed else tuple(spec.shape)}; the weights do not "
                                f"belong to this config")
        extra = sorted(n for n in self.index if n not in used and not n.endswith(_BUFFERS))
        head = "lm_head.weight"
        if tied and head in extra:
            efile, embed, _ = self._locate("embed.wte")  # (the model reads it: present, checked above)
            if _equal(self.index[head], head, efile, embed):
                extra.remove(head)
            else:
                raise ConfigError(f"{config} says tie_word_embeddings=true, but the checkpoint's {head} differs from "
                                  f"its embedding: fuyou would drop it and tie the head to the embedding. Set "
                                  f'"tie_word_embeddings": false in {config} to train the separate head (what the '
                                  f"weights hold), or remove {head} from the weights to tie them")
        if extra:
            more = f" and {len(extra) - 5} more" if len(extra) > 5 else ""
            raise ConfigError(f"{self.path} holds tensors the model {config} describes does not use: "
                              f"{', '.join(extra[:5])}{more}; config.json and the weights disagree (layers, biases, "
                              f"a separate head): fix config.json, or remove the tensors that are not the model's")

    def _locate(self, key):
        name, transposed = hf_name(key, self.family)
        if name not in self.index and name.startswith("transformer."):  # GPT-2 saved without the prefix
            name = name.removeprefix("transformer.")
        if name not in self.index:
            raise DataError(f"{self.path}: the checkpoint has no tensor {hf_name(key, self.family)[0]!r} "
                            f"(fuyou's {key}); the weights are incomplete or of another architecture")
        return self.index[name], name, transposed


class FuyouWeights(_Reader):
    """A fuyou ``model.safetensors`` (fuyou's parameter names, fp32, the model config in the metadata)."""

    def __init__(self, file: Path):
        self.path = file
        keys, meta = _keys(file)
        if "fuyou_model" not in meta:
            raise ConfigError(f"{file} was not written by fuyou (no fuyou_model metadata) and {file.parent} has no "
                              f"config.json: a Hugging Face model directory needs its config.json, a fuyou run "
                              f"directory the model.safetensors fuyou wrote")
        self.model = json.loads(meta["fuyou_model"])
        self.family = self.model["family"]
        self.index = {k: file for k in keys}

    def _locate(self, key):
        if key not in self.index:
            raise DataError(f"{self.path} has no tensor {key!r}; the weights do not belong to this config")
        return self.path, key, False


def write_safetensors(path: Path, shapes: dict[str, tuple[int, ...]], chunks: Iterable[torch.Tensor],
                      metadata: dict[str, str] | None = None) -> Path:
    """Write fp32 tensors as safetensors without holding them all: ``chunks`` yields the tensors'
    values in ``shapes`` order as a flat stream cut anywhere. Atomic (tmp file, rename).

    The format: 8-byte little-endian header length, a JSON header (dtype, shape and byte offsets per
    tensor, padded with spaces to a multiple of 8), then the raw little-endian data.
    """
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for key, shape in shapes.items():
        n = 4 * math.prod(shape)
        header[key] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    host = socket.gethostname().replace(".", "-")
    tmp = path.with_name(f"{path.name}.tmp.{host}.{os.getpid()}")  # one name per writer
    # a writer killed mid-file (a pass: one model's size per kill, kept): this machine's, whose PID is gone
    # (another machine's, on a shared file system, cannot be told from here)
    for stale in path.parent.glob(f"{path.name}.tmp.{host}.*"):
        pid = stale.name.rpartition(".")[2]
        if pid.isdigit() and int(pid) != os.getpid() and process_gone(int(pid)):
            stale.unlink(missing_ok=True)
    written = 0
    try:
        with tmp.open("wb") as fh:
            fh.write(struct.pack("<Q", len(blob)))
            fh.write(blob)
            for c in chunks:
                c = c.detach().to("cpu", torch.float32).contiguous().reshape(-1)
                fh.write(c.numpy().tobytes())
                written += 4 * c.numel()
            fh.flush()
            os.fsync(fh.fileno())  # durable before it replaces anything (and before the state may go)
        if written != offset:
            raise AssertionError(f"write_safetensors: got {written} bytes of data, the header says {offset}")
        tmp.replace(path)
        fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
