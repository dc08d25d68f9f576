"""Fine-tuning records -> token sequences with a loss flag per token.

A JSON-lines record is one of (``data.format``; ``auto`` detects it from the keys of the first record):

- ``text``: ``{"text": ...}`` (the field is ``data.jsonl_field``), a document for plain language-model
  training: every token carries loss;
- ``prompt_completion`` (TRL's convention): ``{"prompt": ..., "completion": ...}``, ``response`` or
  ``output`` accepted for the completion;
- ``alpaca``: ``{"instruction": ..., "input": ..., "output": ...}`` (``input`` optional), rendered with
  the Stanford Alpaca prompt (``ALPACA_PROMPT``);
- ``messages``: ``{"messages": [{"role": ..., "content": ...}, ...]}``, rendered with the tokenizer's
  own chat template (transformers' ``apply_chat_template``) or, when it has none (the byte tokenizer,
  a base model's tokenizer), with ``FALLBACK_TEMPLATE`` (ChatML's markers as plain text).

By default only the completion, or the assistant turns, carry loss (``data.train_on_prompt=false``): the
model learns to answer, not to predict the user's questions (TRL's ``completion_only_loss``,
torchtune's ``train_on_input=False``). A prompt starts with the tokenizer's BOS token when it defines
one and adds it (Llama's does, GPT-2's and Qwen's do not); a completion ends with its EOS token, which
carries loss, so the model learns to stop. Chat templates place their own special tokens.

How a chat template's assistant turns are found: the conversation is rendered one message at a time;
the text an assistant message adds after ``render(messages[:k], add_generation_prompt=True)`` is that
turn's (its content and end-of-turn marker), everything else is prompt. This needs a template whose
renderings of a conversation's prefixes are prefixes of one another; templates that rewrite earlier turns
(Qwen3's drops earlier reasoning) are detected, and then only the last assistant turn carries loss
(it always follows the full prompt), with a count of such records in the report.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fuyou.errors import DataError

FORMATS = ("auto", "text", "prompt_completion", "alpaca", "messages")
COMPLETION_KEYS = ("completion", "response", "output")

ALPACA_PROMPT = (
    "Below is an instruction that describes a task{paired}. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\n{instruction}\n\n{input}### Response:\n"
)
ALPACA_PAIRED = ", paired with an input that provides further context"

# ChatML's markers as plain text: a tokenizer without a chat template still sees where turns start and
# end; each assistant turn is followed by the tokenizer's EOS token (which carries loss).
FALLBACK_TEMPLATE = "<|im_start|>{role}\n{content}<|im_end|>\n"
FALLBACK_GENERATION = "<|im_start|>assistant\n"


@dataclass
class Rendered:
    """One record as token ids and, per token, whether it is a target that carries loss."""

    ids: list[int] = field(default_factory=list)
    loss: list[bool] = field(default_factory=list)

    def add(self, ids: list[int], loss: bool) -> None:
        self.ids.extend(ids)
        self.loss.extend([loss] * len(ids))

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(token ids as int64, loss flags as uint8): compact, for holding many examples."""
        return np.asarray(self.ids, dtype=np.int64), np.asarray(self.loss, dtype=np.uint8)


@dataclass
class RenderStats:
    """What rendering did, for ``fuyou data prepare``'s report."""

    records: int = 0
    last_turn_only: int = 0  # conversations whose template rewrites earlier turns (module docstring)
    fallback_chats: int = 0  # conversations rendered with the fallback template (the tokenizer has none)
    formats: dict[str, int] = field(default_factory=dict)


def detect(rec: dict, text_field: str, where: str) -> str:
    """The format of one record, from its keys."""
    if "messages" in rec:
        return "messages"
    if "instruction" in rec and "output" in rec:
        return "alpaca"
    if "prompt" in rec and any(k in rec for k in COMPLETION_KEYS):
        return "prompt_completion"
    if text_field in rec:
        return "text"
    raise DataError(
        f"{where}: a record with keys {sorted(rec)} is none of the formats fuyou reads: "
        f"{{{text_field!r}: ...}} (text), {{'prompt', 'completion'|'response'|'output'}}, "
        f"{{'instruction', 'input', 'output'}} (Alpaca) or {{'messages': [{{'role', 'content'}}, ...]}}"
    )


def _string(rec: dict, key: str, where: str, optional: bool = False) -> str:
    v = rec.get(key)
    if v is None and optional:
        return ""
    if not isinstance(v, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {type(v).__name__}")
    return v


class Renderer:
    """Renders records of one format with one tokenizer (``fuyou.data.tokenizer``)."""

    def __init__(self, tok, fmt: str, train_on_prompt: bool, text_field: str = "text"):
        self.tok, self.fmt, self.train_on_prompt, self.text_field = tok, fmt, train_on_prompt, text_field
        self.stats = RenderStats()
        self.template = getattr(tok, "chat_template", None)

    def __call__(self, rec: dict, where: str) -> Rendered:
        fmt = self.fmt if self.fmt != "auto" else detect(rec, self.text_field, where)
        if self.fmt != "auto" and fmt != "text" and detect(rec, self.text_field, where) != fmt:
            raise DataError(f"{where}: data.format={fmt} but this record is {detect(rec, self.text_field, where)}")
        self.stats.records += 1
        self.stats.formats[fmt] = self.stats.formats.get(fmt, 0) + 1
        if fmt == "text":
            out = Rendered()
            out.add(self.tok.encode(_string(rec, self.text_field, where)), True)
            return out
        if fmt == "messages":
            out = self._messages(rec.get("messages"), where)
        else:
            if fmt == "alpaca":
                inp = _string(rec, "input", where, optional=True)
                prompt = ALPACA_PROMPT.format(paired=ALPACA_PAIRED if inp else "",
                                              instruction=_string(rec, "instruction", where),
                                              input=f"### Input:\n{inp}\n\n" if inp else "")
                completion = _string(rec, "output", where)
            else:
                prompt = _string(rec, "prompt", where)
                completion = _string(rec, next(k for k in COMPLETION_KEYS if k in rec), where)
            out = Rendered()
            out.add(self.tok.encode_prompt(prompt), False)
            out.add(self.tok.encode(completion) + [self.tok.eos_id], True)
        if self.train_on_prompt:
            out.loss = [True] * len(out.ids)
        return out

    # -- conversations ---------------------------------------------------------------------------
    def _messages(self, messages, where: str) -> Rendered:
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise DataError(f"{where}: messages[{i}] must be an object with string 'role' and 'content'")
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{where}: the conversation has no assistant message, so nothing in it carries loss; "
                            f"remove it or add the assistant's answer")
        if self.template is None:
            self.stats.fallback_chats += 1
            return self._fallback(messages)
        return self._templated(messages, where)

    def _fallback(self, messages: list[dict]) -> Rendered:
        out = Rendered()
        bos = self.tok.encode_prompt("")  # the BOS token, if the tokenizer adds one
        out.add(bos, False)
        for m in messages:
            if m["role"] == "assistant":
                out.add(self.tok.encode(FALLBACK_GENERATION), False)
                out.add(self.tok.encode(m["content"] + "<|im_end|>\n") + [self.tok.eos_id], True)
            else:
                out.add(self.tok.encode(FALLBACK_TEMPLATE.format(**m)), False)
        return out

    def _templated(self, messages: list[dict], where: str) -> Rendered:
        try:
            return self._templated_turns(messages, where)
        except DataError as e:
            if str(e).startswith(where):
                raise
            raise DataError(f"{where}: {e}") from e

    def _templated_turns(self, messages: list[dict], where: str) -> Rendered:
        render = self.tok.render_chat
        pieces: list[tuple[str, bool]] = []  # (text, loss)
        done = ""
        for k, m in enumerate(messages):
            if m["role"] == "assistant":
                head = render(messages[:k], add_generation_prompt=True) if k else ""  # (no turn before: no prompt)
                full = render(messages[: k + 1], add_generation_prompt=False)
                if not head.startswith(done) or not full.startswith(head):
                    return self._last_turn_only(messages, where)
                pieces += [(head[len(done):], False), (full[len(head):], True)]
                done = full
            else:
                full = render(messages[: k + 1], add_generation_prompt=False)
                if not full.startswith(done):
                    return self._last_turn_only(messages, where)
                pieces.append((full[len(done):], False))
                done = full
        out = Rendered()
        for text, loss in pieces:
            if text:
                out.add(self.tok.encode(text), loss)
        return out

    def _last_turn_only(self, messages: list[dict], where: str) -> Rendered:
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        render = self.tok.render_chat
        head = render(messages[:last], add_generation_prompt=True)
        full = render(messages[: last + 1], add_generation_prompt=False)
        if not full.startswith(head):
            raise DataError(f"{where}: the tokenizer's chat template renders the last assistant turn's prompt "
                            f"differently from the conversation ({head[-60:]!r} is not a prefix); cannot tell which "
                            f"tokens are the answer. Set data.train_on_prompt=true or use a prompt/completion file")
        self.stats.last_turn_only += 1
        out = Rendered()
        out.add(self.tok.encode(head), False)
        out.add(self.tok.encode(full[len(head):]), True)
        return out
