"""Tokenizers: a byte-level one with no files, and Hugging Face tokenizers from a local directory."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Protocol

import numpy as np

from fuyou.errors import DataError


def compact_ids(ids) -> np.ndarray:
    """Token ids in 16 bits where they fit, else 32: how a document or an example is held until it is
    written (as int64 they took four times the memory: `fuyou data prepare` of 78 MB of text peaked at
    1.6 GB, a pass)."""
    a = np.asarray(ids)
    return a.astype(np.uint16 if int(a.max(initial=0)) < 2**16 else np.uint32, copy=False)


class Tokenizer(Protocol):
    name: str
    vocab_size: int
    eos_id: int
    pad_id: int
    fingerprint: str       # names the vocabulary: data and model must agree on it (``check_tokenizer``)
    chat_template: str | None

    def encode(self, text: str) -> list[int]: ...

    def encode_prompt(self, text: str) -> list[int]:
        """``text`` as the start of a sequence: with the BOS token when the tokenizer adds one."""

    def render_chat(self, messages: list[dict], add_generation_prompt: bool, tools: list | None = None,
                    template: str | None = None) -> str: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, end-of-document token 256. Vocabulary 257 (models pad to 320)."""

    name = "byte"
    vocab_size = 257
    eos_id = 256
    pad_id = 256
    fingerprint = "byte"
    chat_template = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_prompt(self, text: str) -> list[int]:
        return self.encode(text)

    def render_chat(self, messages, add_generation_prompt, tools=None):
        raise NotImplementedError("the byte tokenizer has no chat template (fuyou.data.formats uses its fallback)")

    def encode_np(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


TOKENIZER_FILES = ("tokenizer*", "vocab*", "*.model", "*.tiktoken")  # what a tokenizer directory holds, one of


def _holds_tokenizer(d: Path) -> bool:
    return any(f.is_file() for pattern in TOKENIZER_FILES for f in d.glob(pattern))


class HFTokenizer:
    """A tokenizer loaded from a local Hugging Face directory (needs the ``hf`` extra)."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if path.is_file():
            parent = path.resolve().parent  # (named only where it holds a tokenizer: a data file's directory, named,
            # was "." : a pass)
            raise DataError(f"{path} is a file: give the directory that holds a tokenizer's files together "
                            f"(tokenizer.json, tokenizer_config.json, ...)" + (f", {parent}" if _holds_tokenizer(parent)
                                                                              else "; its directory holds none"))
        if not path.is_dir():
            raise DataError(f"tokenizer directory {path} does not exist; give a local Hugging Face model directory")
        if not _holds_tokenizer(path):
            raise DataError(f"{path} holds no tokenizer (no {', '.join(TOKENIZER_FILES)}); give the directory of a "
                            f"Hugging Face model or tokenizer, or 'byte'")
        try:
            from transformers import AutoTokenizer  # optional dependency, imported lazily
        except ImportError:
            raise DataError(
                "a Hugging Face tokenizer needs the 'hf' extra: pip install 'fuyou[hf]'"
            ) from None
        try:
            self._tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except Exception as e:  # transformers raises many kinds; all mean "not a usable tokenizer dir"
            raise DataError(f"cannot load a tokenizer from {path}: {e}") from e
        self.name = f"hf:{path.resolve()}"  # absolute: prepared data records it, read from anywhere
        self.vocab_size = len(self._tok)
        eos = self._tok.eos_token_id
        self.eos_id = int(eos) if eos is not None else self.vocab_size - 1
        if eos is None:
            print(f"fuyou: note: the tokenizer in {path} defines no EOS token; fuyou ends documents and answers with "
                  f"its last id, {self.eos_id} ({self._tok.convert_ids_to_tokens(self.eos_id)!r}), which the model "
                  f"then learns as its stop token: set eos_token in {path / 'tokenizer_config.json'} to the model's "
                  f"own", file=sys.stderr)
        pad = self._tok.pad_token_id
        self.pad_id = int(pad) if pad is not None else self.eos_id
        self.stop_ids = {self.eos_id} | generation_stops(path)
        self.chat_template = getattr(self._tok, "chat_template", None) or None
        # the special tokens it puts before a sequence (Llama's BOS), never its EOS
        self._prefix = [i for i in self._tok.encode("", add_special_tokens=True) if i != self.eos_id]
        self.fallback_template = self._fallback_template(eos is not None)
        vocab = json.dumps(sorted(self._tok.get_vocab().items()), ensure_ascii=False).encode()
        self.fingerprint = f"{self.vocab_size}:{hashlib.sha256(vocab).hexdigest()[:16]}"

    def _fallback_template(self, has_eos: bool) -> str | None:
        """fuyou's fallback chat format as this tokenizer's template (``formats.fallback_chat_template``), where
        its text tokenizes back to the ids: its BOS and EOS special tokens; else None."""
        from fuyou.data.formats import fallback_chat_template

        special = set(self._tok.all_special_ids)
        if not has_eos or not all(i in special for i in [*self._prefix, self.eos_id]):
            return None
        names = self._tok.convert_ids_to_tokens([*self._prefix, self.eos_id])
        try:
            return fallback_chat_template("".join(names[:-1]), names[-1])
        except ValueError:
            return None

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False)

    #: characters a piece of a long document is encoded in (``encode_np``)
    PIECE = 1 << 18

    def encode_np(self, text: str) -> np.ndarray:
        """``encode(text)`` as compact ids (``compact_ids``), a long document in pieces of about ``PIECE``
        characters cut after a line break that a line starting with a non-space follows: the tokenizer holds
        well over a hundred bytes a character while it encodes (a 60 MB text file, one document, peaked at
        9.3 GB, a pass). A piece boundary is kept only where the tokenizer's pre-tokenizer starts a word (BPE
        merges stay within words) and the two lines around it encode as they do together (a tokenizer that
        marks the start of each encoding, as SentencePiece's word prefix does, or has no pre-tokenizer, gets
        the document whole), so the ids are the whole document's."""
        cuts = self._cuts(text) if len(text) > 2 * self.PIECE else []
        if not cuts:
            return compact_ids(np.asarray(self.encode(text), dtype=np.int64))
        pieces, a = [], 0
        for c in [*cuts, len(text)]:
            pieces.append(compact_ids(np.asarray(self.encode(text[a:c]), dtype=np.int64)))
            a = c
        return compact_ids(np.concatenate(pieces)) if pieces else np.zeros(0, np.uint16)

    def _cuts(self, text: str) -> list[int]:
        """Where ``encode_np`` may cut ``text``: about every ``PIECE`` characters, after a line break that a
        non-space follows, where the lines either side encode apart as together; none if a boundary fails."""
        bt = getattr(self._tok, "backend_tokenizer", None)  # (a fast tokenizer's: its pre-tokenizer cuts words)
        if bt is None or bt.pre_tokenizer is None:  # one "word" may span the document: merges could cross any cut
            return []
        cuts, pos = [], self.PIECE
        while pos < len(text) - self.PIECE:
            c = pos
            while c < len(text) and not (text[c - 1] == "\n" and not text[c].isspace()):
                c = text.find("\n", c) + 1 or len(text)
            if c >= len(text) - 1:
                break
            before = text[max(text.rfind("\n", 0, c - 1) + 1, c - 200):c]
            after = text[c:c + 200]
            after = after[:after.find("\n") + 1] or after
            window = before + after
            if bt.normalizer is not None and bt.normalizer.normalize_str(window) != window:
                return []  # (a normalizer that changes text: offsets and boundaries are not the text's)
            if len(before) not in {a for _, (a, _) in bt.pre_tokenizer.pre_tokenize_str(window)}:
                return []  # (no word starts at the cut: a merge could span it, beyond what a window shows; a review)
            if self.encode(window) != self.encode(before) + self.encode(after):
                return []  # (this tokenizer's encoding is not separable there: the document goes whole)
            cuts.append(c)
            pos = c + self.PIECE
        return cuts

    def encode_prompt(self, text: str) -> list[int]:
        return self._prefix + self.encode(text)

    def encode_offsets(self, text: str) -> tuple[list[int], list] | None:
        """``encode(text)`` and each token's (start, end) in characters of ``text``; None where the tokenizer
        cannot say (a slow, Python one)."""
        if not getattr(self._tok, "is_fast", False):
            return None
        enc = self._tok(text, add_special_tokens=False, return_offsets_mapping=True)
        return enc["input_ids"], enc["offset_mapping"]

    def render_chat(self, messages: list[dict], add_generation_prompt: bool, tools: list | None = None,
                    template: str | None = None) -> str:
        """``messages`` in the tokenizer's chat template (``template``: this one instead)."""
        try:
            return self._tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                                 **({"tools": tools} if tools else {}),
                                                 **({"chat_template": template} if template else {}))
        except Exception as e:  # jinja raises its own kinds (a template that refuses a role order, ...)
            raise DataError(f"the chat template of {self.name} cannot render this conversation: {e}") from e

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)


def load_tokenizer(spec: str) -> Tokenizer:
    """``"byte"`` or a path to a local Hugging Face tokenizer/model directory."""
    if spec == "byte":
        return ByteTokenizer()
    return HFTokenizer(spec)


def generation_stops(path: Path) -> set[int]:
    """The token ids generation stops on besides the EOS: those the directory's generation_config.json lists
    (a chat model's end of turn beside its end of text: Llama 3's <|eot_id|>, Gemma's <end_of_turn>)."""
    try:
        listed = json.loads((path / "generation_config.json").read_text()).get("eos_token_id")
    except (OSError, ValueError, AttributeError):
        return set()
    return {i for i in (listed if isinstance(listed, list) else [listed]) if isinstance(i, int)}
