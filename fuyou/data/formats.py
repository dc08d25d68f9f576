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
  a base model's tokenizer), with ``FALLBACK_TEMPLATE`` (ChatML's markers as plain text). OpenAI's
  fine-tuning keys are read: an assistant message's ``weight`` (0: no loss on that turn, 1: loss) and
  ``tool_calls`` (``content`` may then be null; rendered by a chat template that renders tool calls,
  refused where it would be dropped); every key but ``weight`` goes to the chat template (so
  ``reasoning_content`` reaches a template that writes it), and one the rendering writes nothing of is
  counted as ignored. TRL's conversational prompt/completion (both lists of messages) is a
  conversation whose completion alone carries loss;
- ``sharegpt``: ``{"conversations": [{"from": "human"|"gpt"|"system"|..., "value": ...}, ...]}``, read as
  ``messages`` (``SHAREGPT_ROLES``).

A conversation with no assistant turn to learn (none, or every one of weight 0) is skipped and counted
(``RenderStats.no_answer``), not trained on: nothing in it would carry loss.

By default only the completion, or the assistant turns, carry loss (``data.train_on_prompt=false``; with
``true`` every token does, but an assistant turn of weight 0): the
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

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from fuyou.data.corpus import json_type
from fuyou.data.tokenizer import compact_ids
from fuyou.errors import DataError

FORMATS = ("auto", "text", "prompt_completion", "alpaca", "messages", "sharegpt")
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
CONTENT_MARK = "\ue000fuyou-content\ue000"  # (a private-use character: no template writes it of its own)

# ShareGPT's speakers ("from") as chat roles
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
                  "model": "assistant", "function_call": "assistant", "system": "system", "tool": "tool",
                  "function": "tool", "observation": "tool", "ipython": "tool"}
# (LLaMA-Factory's "function_call" is the assistant's call written as text, "observation" the tool's answer)
# the roles of chat messages fuyou knows; a message of another role is prompt, and counted (``RenderStats``)
KNOWN_ROLES = ("system", "developer", "user", "assistant", "tool", "function", "ipython")
# message keys every chat rendering reads; any other key (but ``weight``, read here) goes to the chat template
# too, and is counted as ignored where the rendering writes nothing of it
TEMPLATE_KEYS = ("role", "content", "tool_calls", "tool_call_id", "name")


def fallback_chat_template(prefix: str, eos: str) -> str:
    """The fallback as a Jinja chat template, for a Hugging Face tokenizer without one: ``prefix``, the text of
    the special tokens it puts before a sequence (its BOS), and ``eos``, its EOS token's text. A conversation is
    rendered with it and tokenized as one text, as a chat template's, and an export writes it as the model's
    chat template (a new-user pass: an export of a model trained on this format carried none, and
    ``apply_chat_template`` refused it), so inference prompts the model with the tokens it was trained on."""
    for text in (prefix, eos):
        if "{" in text or "}" in text or "%" in text:
            raise ValueError(f"{text!r} cannot stand in a template's text")
    # (no newline right after a tag: transformers renders with trim_blocks, which would drop it)
    return (prefix + "{% for message in messages %}{% if message['role'] == 'assistant' %}"
            + FALLBACK_GENERATION + "{{ message['content'] }}<|im_end|>\n" + eos
            + "{% else %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endif %}"
            "{% endfor %}{% if add_generation_prompt %}" + FALLBACK_GENERATION + "{% endif %}")


@dataclass
class Rendered:
    """One record as token ids and, per token, whether it is a target that carries loss."""

    ids: list[int] = field(default_factory=list)
    loss: list[bool] = field(default_factory=list)

    def add(self, ids: list[int], loss: bool) -> None:
        self.ids.extend(ids)
        self.loss.extend([loss] * len(ids))

    def add_text(self, tok, pieces: list[tuple[str, bool]]) -> None:
        """Text pieces (text, loss) tokenized as one text, as the model meets them at inference (a chat template's
        rendering, a prompt and its completion): encoded one by one, a SentencePiece-style tokenizer (Llama 2's,
        Mistral's) begins each with a word-start mark that the whole text has not, answer tokens included (a
        new-user pass). A token's loss flag is its characters': from the end of the token before it (offsets
        that leave out a token's leading space, trim_offsets, still count it) to its own end. Where a token
        of the whole text would span a prompt's end and its answer's start (a word cut in two, "w2" + "w3", or
        a prompt's trailing space taken into the answer's first word), the text is cut there and each side
        tokenized alone, as before: the prompt as inference tokenizes it, the answer possibly with a
        word-start mark of its own. A tokenizer that gives no offsets (a slow one): piece by piece."""
        pieces = [(t, loss) for t, loss in pieces if t]
        flags, text = [loss for _, loss in pieces], "".join(t for t, _ in pieces)
        if len(set(flags)) <= 1:  # (one flag: one text)
            if pieces:
                self.add(tok.encode(text), flags[0])
            return
        enc = tok.encode_offsets(text) if hasattr(tok, "encode_offsets") else None
        if enc is None or not enc[0]:
            for text, loss in pieces:
                self.add(tok.encode(text), loss)
            return
        ids, spans = enc
        char = np.repeat(np.array(flags, dtype=np.int64), [len(t) for t, _ in pieces])
        n = len(char)
        marked = np.concatenate([[0], np.cumsum(char)])  # char[a:b].sum() == marked[b] - marked[a]
        sp = np.minimum(np.asarray(spans, dtype=np.int64).reshape(-1, 2), n)
        a, b = sp[:, 0], sp[:, 1]
        before = np.concatenate([[0], np.maximum.accumulate(b)[:-1]])  # where the tokens before end
        a = np.minimum(a, before)
        b = np.minimum(np.maximum(b, a + 1), n)  # (an empty span at the end: the last character)
        a = np.minimum(a, b - 1)
        k = marked[b] - marked[a]
        straddles = (k > 0) & (k < b - a)
        if straddles.any():  # cut at the flag changes inside those tokens
            change = set(np.flatnonzero(char[1:] != char[:-1]) + 1)
            cuts = {c for x, y in zip(a[straddles], b[straddles]) for c in range(x + 1, y) if c in change}
            groups, at = [[]], 0
            for text, loss in pieces:
                if at in cuts:
                    groups.append([])
                groups[-1].append((text, loss))
                at += len(text)
            for g in groups:
                self.add_text(tok, g)
            return
        self.ids.extend(ids)
        self.loss.extend((k > 0).tolist())

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(token ids in 16 or 32 bits, loss flags as uint8): compact, for holding many examples."""
        return compact_ids(np.asarray(self.ids, dtype=np.int64)), np.asarray(self.loss, dtype=np.uint8)


@dataclass
class RenderStats:
    """What rendering did, for ``fuyou data prepare``'s report."""

    records: int = 0
    last_turn_only: int = 0  # conversations whose template rewrites earlier turns (module docstring)
    fallback_chats: int = 0  # conversations rendered with the fallback template (the tokenizer has none)
    formats: dict[str, int] = field(default_factory=dict)
    no_answer: int = 0       # conversations skipped: no assistant turn to learn (module docstring)
    first_no_answer: str = ""
    empty_answers: int = 0   # assistant turns with loss and no content: trained as an immediate end of turn
    first_empty_answer: str = ""
    ignored_keys: Counter = field(default_factory=Counter)  # message keys no rendering writes, and how often
    other_roles: Counter = field(default_factory=Counter)  # roles but KNOWN_ROLES: rendered as prompt (no loss)
    rewritten_weight0: int = 0  # train_on_prompt, a rewritten history with a weight-0 turn: its prompt has no loss
    first_rewritten_weight0: str = ""
    mixed: Counter = field(default_factory=Counter)  # (format read, other formats whose keys it holds): records
    no_stop: int = 0         # templated conversations whose answers hold no token that generation stops on
    first_no_stop: str = ""
    stop_said: str = ""      # what their answers end with, and the tokens generation stops on
    train_on_prompt: bool = False  # (the prompt carries loss: so do other roles' messages; the note said not)

    def empty_answer(self, where: str) -> None:
        """An answer with loss and no content (an assistant turn or a completion), counted for ``notes``."""
        self.empty_answers += 1
        self.first_empty_answer = self.first_empty_answer or where

    def notes(self) -> list[str]:
        """What a user should know about the rendering (``fuyou data prepare`` and training print them)."""
        out = []
        if self.no_answer:
            out.append(f"{self.no_answer} conversation(s) with no assistant turn to learn (none, or each of weight 0) "
                       f"skipped, the first at {self.first_no_answer}")
        if self.empty_answers:
            out.append(f"{self.empty_answers} assistant turn(s) or completion(s) with empty content carry loss: the "
                       f"model learns to end its turn at once there (the first at {self.first_empty_answer}); remove "
                       f"them (or give an assistant turn \"weight\": 0), if that is not what you want")
        if self.other_roles:
            roles = ", ".join(f"{k!r} ({n}x)" for k, n in sorted(self.other_roles.items()))
            loss = "with loss as all prompt (data.train_on_prompt)" if self.train_on_prompt else "without loss"
            out.append(f"messages of roles other than {', '.join(KNOWN_ROLES)} are prompt, {loss}: {roles}; "
                       f"if they are the model's answers, name their role 'assistant'")
        if self.rewritten_weight0:
            out.append(f"{self.rewritten_weight0} conversation(s) hold an assistant turn of weight 0 in a history the "
                       f"chat template rewrites (last-turn-only), where its tokens cannot be told from the prompt's: "
                       f"their prompt carries no loss despite data.train_on_prompt, so that the weight-0 turn carries "
                       f"none (those with no turn of weight 1 are left out), the first at "
                       f"{self.first_rewritten_weight0}")
        for (read, *others), n in sorted(self.mixed.items()):
            out.append(f"{n} record(s) hold the fields of {read} and of {' and '.join(others)}: read as {read}, the "
                       f"others' fields ignored (data.format / --format reads them as another)")
        if self.no_stop:
            out.append(f"{self.no_stop} conversation(s)' answers hold no token generation stops on: {self.stop_said} "
                       f"(the first at {self.first_no_stop}); the fine-tuned model would go on past the end of its "
                       f"turn (a base model's tokenizer with an instruct template, say): set the tokenizer's "
                       f"eos_token (tokenizer_config.json) and generation_config.json's eos_token_id to the token "
                       f"that ends a turn")
        if self.ignored_keys:
            keys = ", ".join(f"{k!r} ({n}x)" for k, n in sorted(self.ignored_keys.items()))
            out.append(f"message keys the chat rendering writes nothing of were ignored: {keys} (every key goes to "
                       f"the tokenizer's chat template; fuyou reads an assistant message's 'weight')")
        return out


# The keys that make a record of each fine-tuning format (``detect`` picks the first that a record has)
FORMAT_KEYS = {"messages": lambda r: "messages" in r, "sharegpt": lambda r: "conversations" in r,
               "alpaca": lambda r: "instruction" in r and "output" in r,
               "prompt_completion": lambda r: "prompt" in r and any(k in r for k in COMPLETION_KEYS)}


def detect(rec: dict, text_field: str, where: str) -> str:
    """The format of one record, from its keys."""
    found = next((fmt for fmt, holds in FORMAT_KEYS.items() if holds(rec)), None)
    if found is not None:
        return found
    if text_field in rec:
        return "text"
    raise DataError(
        f"{where}: a record with keys {sorted(rec)} is none of the formats fuyou reads: "
        f"{{{text_field!r}: ...}} (text), {{'prompt', 'completion'|'response'|'output'}}, "
        f"{{'instruction', 'input', 'output'}} (Alpaca), {{'messages': [{{'role', 'content'}}, ...]}} or ShareGPT's "
        f"{{'conversations': [{{'from', 'value'}}, ...]}}"
    )


def _string(rec: dict, key: str, where: str, optional: bool = False) -> str:
    v = rec.get(key)
    if v is None and optional:
        return ""
    if not isinstance(v, str):
        raise DataError(f"{where}: field {key!r} must be a string, got a JSON {json_type(v)}")
    return v


class Renderer:
    """Renders records of one format with one tokenizer (``fuyou.data.tokenizer``)."""

    def __init__(self, tok, fmt: str, train_on_prompt: bool, text_field: str = "text"):
        self.tok, self.fmt, self.train_on_prompt, self.text_field = tok, fmt, train_on_prompt, text_field
        self.stats = RenderStats(train_on_prompt=train_on_prompt)
        self.template = getattr(tok, "chat_template", None)
        # a Hugging Face tokenizer without a chat template: the fallback as a template (``fallback_chat_template``;
        # None where its BOS or EOS is no special token, and for the byte tokenizer: ``_fallback`` renders ids)
        self.fallback_template = getattr(tok, "fallback_template", None) if self.template is None else None
        self._tools: list | None = None  # the record's tool schemas (OpenAI's "tools"), for its template

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.tok.render_chat(messages, add_generation_prompt=add_generation_prompt, tools=self._tools,
                                    **({"template": self.fallback_template} if self.fallback_template else {}))

    def __call__(self, rec: dict, where: str) -> Rendered | None:
        """The record's tokens and loss flags; None for a conversation with nothing to learn (skipped and
        counted in ``stats``)."""
        fmt = self.fmt if self.fmt != "auto" else detect(rec, self.text_field, where)
        if self.fmt != "auto" and fmt != "text" and not FORMAT_KEYS[fmt](rec):  # (one of several it holds: taken)
            raise DataError(f"{where}: data.format={fmt} but this record is {detect(rec, self.text_field, where)}")
        self.stats.records += 1
        self.stats.formats[fmt] = self.stats.formats.get(fmt, 0) + 1
        if self.fmt == "auto":  # (a record with messages and prompt/completion was read as messages in silence)
            others = [k for k, keys in FORMAT_KEYS.items() if k != fmt and keys(rec)]
            if others:
                self.stats.mixed[(fmt, *others)] += 1
        if fmt == "text":
            out = Rendered()
            out.add(self.tok.encode(_string(rec, self.text_field, where)), True)
            return out
        if fmt in ("messages", "sharegpt") or (fmt == "prompt_completion" and isinstance(rec.get("prompt"), list)):
            self._tools = self._record_tools(rec, where)
            if fmt == "sharegpt":
                turns = self._sharegpt(rec.get("conversations"), where)
            elif fmt == "messages":
                turns = self._checked(rec.get("messages"), where, "messages")
            else:  # TRL's conversational prompt/completion: the prompt's turns carry no loss
                completion = rec.get(next(k for k in COMPLETION_KEYS if k in rec))
                if not isinstance(completion, list):
                    raise DataError(f"{where}: a conversational 'prompt' (a list of messages) needs its completion as "
                                    f"a list of messages too, got a JSON {json_type(completion)}")
                turns = ([(m, learn and self.train_on_prompt) for m, learn in self._checked(rec["prompt"], where,
                                                                                             "prompt")]
                         + self._checked(completion, where, "completion"))
            out = self._messages(turns, where)
            if out is None:
                return None
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
            if not completion.strip():
                self.stats.empty_answer(where)
            out = Rendered()
            out.add(self.tok.encode_prompt(""), False)  # (the BOS token, if the tokenizer adds one)
            out.add_text(self.tok, [(prompt, self.train_on_prompt), (completion, True)])
            out.add([self.tok.eos_id], True)
            if self.train_on_prompt:
                out.loss = [True] * len(out.ids)
        return out

    # -- conversations ---------------------------------------------------------------------------
    @staticmethod
    def _record_tools(rec: dict, where: str) -> list | None:
        """The record's tool schemas: OpenAI's ``tools`` list (LLaMA-Factory writes it as a JSON string)."""
        tools = rec.get("tools")
        if isinstance(tools, str):
            import json

            try:
                tools = json.loads(tools) if tools.strip() else None
            except (ValueError, RecursionError):
                raise DataError(f"{where}: 'tools' is a string that is not JSON; give a list of tool schemas") from None
        if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
            raise DataError(f"{where}: 'tools' must be a list of tool schemas (objects)")
        return tools or None

    def _checked(self, messages, where: str, key: str) -> list[tuple[dict, bool]]:
        """The messages of a conversation as (what the template sees, whether the turn carries loss)."""
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: {key!r} must be a non-empty list of {{'role', 'content'}} objects")
        out = []
        for i, m in enumerate(messages):
            at = f"{where}: {key}[{i}]"
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise DataError(f"{at} must be an object with a string 'role' and a string 'content'")
            calls = m.get("tool_calls")
            if not isinstance(m.get("content"), str):
                if not (m.get("content") is None and calls and m["role"] == "assistant"):
                    got = "missing" if "content" not in m else f"a JSON {json_type(m['content'])}"
                    raise DataError(f"{at}: 'content' is {got}; it must be a string (null only in an assistant "
                                    f"message that calls tools: 'tool_calls')")
            if calls is not None and not (isinstance(calls, list) and calls and m["role"] == "assistant"):
                raise DataError(f"{at}: 'tool_calls' must be a non-empty list, in an assistant message")
            weight = m.get("weight", 1)
            if weight not in (0, 1) or isinstance(weight, bool):
                raise DataError(f"{at}: 'weight' is {weight!r}; it must be 0 (no loss on this turn) or 1")
            if "weight" in m and m["role"] != "assistant":  # OpenAI's format reads it on assistant messages only
                self.stats.ignored_keys["weight (not an assistant's)"] += 1
            # every key but weight goes to the chat template (reasoning_content, thinking, ... are the
            # template's to write); one it writes nothing of is counted as ignored (``_count_ignored``)
            learn = weight == 1 if m["role"] == "assistant" else self.train_on_prompt
            if m["role"] not in KNOWN_ROLES:
                self.stats.other_roles[m["role"]] += 1
            if learn and m["role"] == "assistant" and not calls and not m["content"].strip():
                self.stats.empty_answer(at)
            out.append(({k: v for k, v in m.items() if k != "weight"}, learn))
        return out

    def _count_ignored(self, messages: list[dict]) -> None:
        """Message keys beyond role and content that the rendering leaves out: counted for the report."""
        extra = sorted({k for m in messages for k in m if k not in TEMPLATE_KEYS})
        if not extra:
            return
        if self.template is not None or self.fallback_template:
            full = self._render(messages, add_generation_prompt=False)
            extra = [k for k in extra if self._render([{q: v for q, v in m.items() if q != k} for m in messages],
                                                              add_generation_prompt=False) == full]
        self.stats.ignored_keys.update(extra)

    def _sharegpt(self, turns, where: str) -> list[tuple[dict, bool]]:
        """ShareGPT's ``conversations`` as messages (``SHAREGPT_ROLES``)."""
        if not isinstance(turns, list) or not turns:
            raise DataError(f"{where}: 'conversations' must be a non-empty list of {{'from', 'value'}} objects")
        messages = []
        for i, t in enumerate(turns):
            if not isinstance(t, dict) or not isinstance(t.get("from"), str) or not isinstance(t.get("value"), str):
                raise DataError(f"{where}: conversations[{i}] must be an object with string 'from' and 'value'")
            role = SHAREGPT_ROLES.get(t["from"].lower())
            if role is None:
                raise DataError(f"{where}: conversations[{i}] is from {t['from']!r}, which is none of ShareGPT's "
                                f"speakers fuyou knows ({', '.join(SHAREGPT_ROLES)}); rename it, or convert the file "
                                f"to 'messages' with the roles system, user, assistant and tool")
            m = {"role": role, "content": t["value"]}
            if "weight" in t:
                m["weight"] = t["weight"]
            messages.append(m)
        return self._checked(messages, where, "conversations")

    def _messages(self, turns: list[tuple[dict, bool]], where: str) -> Rendered | None:
        if not any(loss for _, loss in turns):
            self.stats.no_answer += 1
            self.stats.first_no_answer = self.stats.first_no_answer or where
            return None
        self._count_ignored([m for m, _ in turns])
        calls = next((i for i, (m, _) in enumerate(turns) if m.get("tool_calls")), None)
        if self._tools and self.template is None:
            raise DataError(f"{where}: the record gives 'tools' (the tool schemas), which fuyou's fallback chat format "
                            f"(for a tokenizer without a chat template) cannot write; give data.tokenizer (or "
                            f"--init-from) a model whose chat template renders tools")
        if self._tools:
            messages = [m for m, _ in turns]
            if self._render(messages, False) == self.tok.render_chat(messages, add_generation_prompt=False):
                raise DataError(f"{where}: the record gives 'tools', but the chat template of {self.tok.name} does "
                                f"not write them: the model would learn its calls without the schemas in its prompt. "
                                f"Use a model whose template renders tools, or leave 'tools' out")
        if self.template is None:
            if calls is not None:
                raise DataError(f"{where}: message {calls} calls tools ('tool_calls'), which fuyou's fallback chat "
                                f"format (for a tokenizer without a chat template) cannot write: the turn would be "
                                f"trained as an empty answer. Give data.tokenizer (or --init-from) a model whose chat "
                                f"template renders tool calls, or leave these conversations out")
            self.stats.fallback_chats += 1
            if self.fallback_template:
                return self._templated(turns, where)
            return self._fallback(turns)
        if calls is not None:
            self._check_template_renders_calls([m for m, _ in turns], calls, where)
        return self._templated(turns, where)

    def _check_template_renders_calls(self, messages: list[dict], i: int, where: str) -> None:
        """A template that ignores ``tool_calls`` would train a tool call as an empty answer: refused."""
        without = dict(messages[i])
        del without["tool_calls"]
        render = self._render
        if render(messages[: i + 1], add_generation_prompt=False) == render(
                messages[:i] + [without], add_generation_prompt=False):
            raise DataError(f"{where}: message {i} calls tools ('tool_calls'), but the chat template of "
                            f"{self.tok.name} does not render them: the turn would be trained as an empty answer. "
                            f"Use a model whose template renders tool calls, or leave these conversations out")

    def _fallback(self, turns: list[tuple[dict, bool]]) -> Rendered:
        out, prompt = Rendered(), self.train_on_prompt
        bos = self.tok.encode_prompt("")  # the BOS token, if the tokenizer adds one
        out.add(bos, prompt)
        pieces: list[tuple[str, bool]] = []  # the text since the last EOS token, tokenized as one
        for m, loss in turns:
            if m["role"] == "assistant":
                pieces += [(FALLBACK_GENERATION, prompt), (m["content"] + "<|im_end|>\n", loss)]
                out.add_text(self.tok, pieces)
                out.add([self.tok.eos_id], loss)
                pieces = []
            else:
                pieces.append((FALLBACK_TEMPLATE.format(role=m["role"], content=m["content"]), loss))
        out.add_text(self.tok, pieces)
        return out

    def _templated(self, turns: list[tuple[dict, bool]], where: str) -> Rendered:
        try:
            return self._templated_turns(turns, where)
        except DataError as e:
            if str(e).startswith(where):
                raise
            raise DataError(f"{where}: {e}") from e

    def _templated_turns(self, turns: list[tuple[dict, bool]], where: str) -> Rendered:
        render = self._render
        messages = [m for m, _ in turns]
        pieces: list[tuple[str, bool]] = []  # (text, loss)
        done = ""
        # Rendered at the assistant turns and once at the end: the messages between two assistant turns are
        # prompt (their loss is train_on_prompt's, as the generation prompt's), so the next turn's head holds
        # them; a template call costs ~0.4 ms whatever the length, so fewer calls is what makes long
        # conversations quick.
        for k, (m, loss) in enumerate(turns):
            if m["role"] != "assistant":
                continue
            full = render(messages[: k + 1], add_generation_prompt=False)
            head = render(messages[:k], add_generation_prompt=True) if k else self._opening(full, m, where)
            if not head.startswith(done) or not full.startswith(head):
                return self._last_turn_only(turns, where)
            pieces += [(head[len(done):], self.train_on_prompt), (full[len(head):], loss)]
            done = full
        if turns[-1][0]["role"] != "assistant":  # messages after the last assistant turn
            full = render(messages, add_generation_prompt=False)
            if not full.startswith(done):
                return self._last_turn_only(turns, where)
            pieces.append((full[len(done):], self.train_on_prompt))
        out = Rendered()
        out.add_text(self.tok, pieces)
        self._check_stop(out, where)
        return out

    def _check_stop(self, out: Rendered, where: str) -> None:
        """Counts a conversation whose answers (the tokens with loss) hold none of the tokens generation stops
        on (the tokenizer's ``stop_ids``): a template that ends a turn with <|eot_id|> over a tokenizer whose
        EOS is <|end_of_text|> trained a model that never stops, in silence (a pass)."""
        answer = [i for i, loss in zip(out.ids, out.loss) if loss]
        stops = getattr(self.tok, "stop_ids", {self.tok.eos_id})
        if not answer or stops & set(answer):
            return
        self.stats.no_stop += 1
        if not self.stats.first_no_stop:
            self.stats.first_no_stop = where
            names = ", ".join(repr(self.tok.decode([i])) for i in sorted(stops))
            self.stats.stop_said = f"they end with {self.tok.decode(answer[-2:])!r}, generation stops on {names}"

    def _opening(self, full: str, m: dict, where: str) -> str:
        """The prompt before a conversation's opening assistant turn (there is no earlier turn to render it
        with a generation prompt): what the template writes before the turn's content (its BOS, a default
        system prompt, the assistant header), found by rendering the turn with a marker as its content (a
        template may trim or reshape the content itself)."""
        probe = self._render([{**m, "content": CONTENT_MARK}], add_generation_prompt=False)
        at = probe.find(CONTENT_MARK)
        if at < 0 or not full.startswith(probe[:at]):
            raise DataError(f"{where}: the conversation opens with an assistant turn, and the chat template writes "
                            f"something before its content that depends on it, so its answer tokens cannot be told "
                            f"from the prompt; start the conversation with a user (or system) message")
        return probe[:at]

    def _last_turn_only(self, turns: list[tuple[dict, bool]], where: str) -> Rendered | None:
        # the last assistant turn to learn (of weight 1), after the conversation up to it as the template
        # renders that prefix; the template rewrites the earlier turns there, so with train_on_prompt the
        # prefix carries loss as a whole, unless it holds an assistant turn of weight 0, whose tokens must carry
        # none (the prefix is then prompt without loss, counted: ``stats.rewritten_weight0``)
        render = self._render
        messages = [m for m, _ in turns]
        learnable = [i for i, (m, loss) in enumerate(turns) if m["role"] == "assistant" and loss]
        last = learnable[-1] if learnable else len(turns)

        def silent(upto: int) -> bool:  # an assistant turn of weight 0 before ``upto``
            return any(m["role"] == "assistant" and not loss for m, loss in turns[:upto])

        def whole(upto: int) -> Rendered:  # train_on_prompt: every token of the conversation up to ``upto``
            out = Rendered()
            out.add(self.tok.encode(render(messages[:upto], add_generation_prompt=False)), True)
            return out

        if not learnable:  # (train_on_prompt: the prompts alone carry loss)
            if silent(len(turns)):
                return self._rewritten_weight0(where)
            return whole(len(turns))
        full = render(messages[: last + 1], add_generation_prompt=False)
        head = render(messages[:last], add_generation_prompt=True) if last else self._opening(full, messages[0], where)
        if not full.startswith(head):  # (the turns after the last one to learn are left out, as below)
            if self.train_on_prompt and not silent(last):
                return whole(last + 1)
            advice = ("Set data.train_on_prompt=true (every token then carries loss), or use a prompt/completion file"
                      if not self.train_on_prompt and not silent(last) else
                      "Use a prompt/completion file, or a tokenizer whose chat template renders a conversation's "
                      "start as the conversation up to that turn does")
            raise DataError(f"{where}: the tokenizer's chat template renders the last assistant turn's prompt "
                            f"differently from the conversation ({head[-60:]!r} is not a prefix); cannot tell which "
                            f"tokens are the answer. {advice}")
        self.stats.last_turn_only += 1
        prompt_loss = self.train_on_prompt
        if prompt_loss and silent(last):
            self._rewritten_weight0(where)
            prompt_loss = False
        out = Rendered()
        out.add_text(self.tok, [(head, prompt_loss), (full[len(head):], True)])
        return out

    def _rewritten_weight0(self, where: str) -> None:
        self.stats.rewritten_weight0 += 1
        self.stats.first_rewritten_weight0 = self.stats.first_rewritten_weight0 or where
