"""Fine-tuning data: formats, loss masks, packing, epochs, prepared examples, tokenizer checks, and the
engine trained on packed, masked data equal to the in-memory reference."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fuyou.config import load_config
from fuyou.data import DataConfig, load_data, tokenize_records
from fuyou.data.dataset import IGNORE
from fuyou.data.examples import ExampleData, Rows, read_examples, write_examples
from fuyou.data.tokenizer import ByteTokenizer
from fuyou.errors import ConfigError, DataError
from fuyou.models import StageModel
from fuyou.models.config import ModelConfig, preset

sys.path.insert(0, str(Path(__file__).parents[1] / "engine"))
from engine_testutil import assert_same_training, make_cfg, run_both  # noqa: E402

CHAT = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
                  {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And of Italy?"},
                  {"role": "assistant", "content": "Rome."}]},
    {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]},
]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def qa_records(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta"]
    out = []
    for i in range(n):
        q = " ".join(rng.choice(words, size=int(rng.integers(2, 9))))
        out.append({"prompt": f"Q{i}: {q}?\nA:", "completion": " " + " ".join(reversed(q.split()))})
    return out


def loss_text(ex, k: int, tok=ByteTokenizer()) -> str:
    """The tokens of example ``k`` that are targets with loss, decoded."""
    s, e = int(ex.offsets[k]), int(ex.offsets[k + 1])
    ids = [int(t) for t, f in zip(ex.tokens[s + 1:e], ex.loss[s + 1:e]) if f]
    return tok.decode(ids), ids


# -- formats ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("rec, prompt, answer", [
    ({"prompt": "Hi?", "completion": " Yes."}, "Hi?", " Yes."),
    ({"prompt": "Hi?", "response": " Yes."}, "Hi?", " Yes."),
    ({"prompt": "Hi?", "output": " Yes."}, "Hi?", " Yes."),
    ({"instruction": "Add.", "input": "2 and 2", "output": "4"},
     "Below is an instruction that describes a task, paired with an input that provides further context. Write a "
     "response that appropriately completes the request.\n\n### Instruction:\nAdd.\n\n### Input:\n2 and 2\n\n"
     "### Response:\n", "4"),
    ({"instruction": "Say hi.", "output": "hi"},  # (Alpaca's own two headers, pinned: a mutation audit)
     "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
     "### Instruction:\nSay hi.\n\n### Response:\n", "hi"),
])
def test_only_the_completion_carries_loss(tmp_path, rec, prompt, answer):
    d = tokenize_records([write_jsonl(tmp_path / "d.jsonl", [rec])], "byte", val_fraction=0.5)
    ex = d.train
    text, ids = loss_text(ex, 0)
    assert text == answer and ids[-1] == ByteTokenizer.eos_id  # the answer and its EOS, nothing else
    full = ByteTokenizer().decode([int(t) for t in ex.tokens])
    assert full.startswith(prompt)
    d2 = tokenize_records([tmp_path / "d.jsonl"], "byte", train_on_prompt=True, val_fraction=0.5)
    assert int(d2.train.loss[1:].sum()) == len(d2.train.tokens) - 1  # every target


def test_chat_fallback_template_masks_user_turns(tmp_path):
    d = tokenize_records([write_jsonl(tmp_path / "c.jsonl", CHAT)], "byte", eval_paths=[tmp_path / "c.jsonl"])
    ex = d.train
    assert len(ex) == 2
    text, _ = loss_text(ex, 0)
    assert text == "Paris.<|im_end|>\n\x00Rome.<|im_end|>\n".replace("\x00", "")  # both assistant turns
    full = ByteTokenizer().decode([int(t) for t in ex.tokens[: ex.offsets[1]]])
    assert "<|im_start|>user\nCapital of France?<|im_end|>" in full and "Be brief." in full


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def hf_tok_dir(tmp_path_factory):
    pytest.importorskip("transformers")
    from hf_testutil import make_tokenizer

    d = tmp_path_factory.mktemp("tok")
    make_tokenizer(d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = CHATML
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return d


sys.path.insert(0, str(Path(__file__).parents[1] / "hf"))


def test_chat_template_assistant_turns(tmp_path, hf_tok_dir):
    from fuyou.data.tokenizer import HFTokenizer

    tok = HFTokenizer(hf_tok_dir)
    assert tok.chat_template
    d = tokenize_records([write_jsonl(tmp_path / "c.jsonl", CHAT)], str(hf_tok_dir), eval_paths=[tmp_path / "c.jsonl"])
    ex = d.train
    s, e = int(ex.offsets[0]), int(ex.offsets[1])
    answer = tok.decode([int(t) for t, f in zip(ex.tokens[s + 1:e], ex.loss[s + 1:e]) if f])
    assert answer.replace(" ", "") == "Paris.<|im_end|>\nRome.<|im_end|>\n".replace(" ", "")
    assert d.info["last_turn_only"] == 0



LLAMA2 = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
          "{{ '[INST] ' + m['content'] + ' [/INST]' }}{% elif m['role'] == 'assistant' %}{{ ' ' + m['content'] + ' ' + eos_token }}{% endif %}{% endfor %}")


def test_sentencepiece_style_tokens_are_the_ones_inference_sees(tmp_path):
    """A Metaspace tokenizer (Llama 2's, Mistral's) puts a word-start mark at the start of each text it encodes:
    chat turns and completions encoded one by one began every answer with a token that the whole conversation,
    as apply_chat_template tokenizes it at inference, has not (a new-user pass: 20 of 38 examples differed).
    Every rendering is now tokenized as one text, the loss flags taken from the characters."""
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from fuyou.data import builtin_documents
    from fuyou.data.formats import Renderer
    from fuyou.data.tokenizer import HFTokenizer

    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    raw.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    raw.train_from_iterator(builtin_documents()[:20], trainers.BpeTrainer(vocab_size=400, show_progress=False,
                                                                          special_tokens=["<unk>", "<s>", "</s>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = LLAMA2
    fast.save_pretrained(tmp_path / "sp")
    tok = HFTokenizer(tmp_path / "sp")
    r = Renderer(tok, "auto", False)
    chat = {"messages": [{"role": "user", "content": "What is the capital of France?"},
                         {"role": "assistant", "content": "Paris, the capital."},
                         {"role": "user", "content": "And of Italy?"}, {"role": "assistant", "content": "Rome."}]}
    out = r(chat, "x")
    assert out.ids == fast(fast.apply_chat_template(chat["messages"], tokenize=False),
                           add_special_tokens=False)["input_ids"]
    answers = tok.decode([i for i, f in zip(out.ids, out.loss) if f])
    assert answers.replace(" ", "") == "Paris,thecapital.</s>Rome.</s>", answers
    # a prompt and its completion: one text, then the EOS token
    out = r({"prompt": "The capital of France is", "completion": " Paris."}, "y")
    whole = fast("The capital of France is Paris.", add_special_tokens=False)["input_ids"]
    assert out.ids == tok.encode_prompt("") + whole + [tok.eos_id]
    assert tok.decode([i for i, f in zip(out.ids, out.loss) if f]).strip() == "Paris.</s>"
    # no chat template: fuyou's fallback, one text between EOS tokens
    fast.chat_template = None
    tok._tok.chat_template = tok.chat_template = None
    out = Renderer(tok, "auto", False)(chat, "z")
    first_eos = out.ids.index(tok.eos_id)
    assert out.ids[len(tok.encode_prompt("")):first_eos] == fast(
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\nParis, the capital."
        "<|im_end|>\n", add_special_tokens=False)["input_ids"]


def test_a_tokenizer_that_ends_every_encoding_with_eos_starts_an_example_with_bos_only(tmp_path):
    """A tokenizer whose post-processor adds BOS and EOS around every text (Llama's add_eos_token=True,
    T5-like templates) gives [BOS, EOS] for the empty text: the prefix fuyou puts before a sequence keeps
    the BOS and drops the EOS, or every example would start by ending (an audit: nothing tested it)."""
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from fuyou.data import builtin_documents
    from fuyou.data.formats import Renderer
    from fuyou.data.tokenizer import HFTokenizer

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.train_from_iterator(builtin_documents()[:20], trainers.BpeTrainer(
        vocab_size=400, show_progress=False, special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    raw.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(tmp_path / "t")
    assert fast.encode("", add_special_tokens=True) == [0, 1]
    tok = HFTokenizer(tmp_path / "t")
    assert tok.encode_prompt("Hi") == [0] + tok.encode("Hi")
    out = Renderer(tok, "auto", False)({"prompt": "The capital of France is", "completion": " Paris."}, "x")
    assert out.ids[0] == 0 and out.ids.count(tok.eos_id) == 1 and out.ids[-1] == tok.eos_id
    chat = {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}
    out = Renderer(tok, "auto", False)(chat, "y")  # no chat template: fuyou's fallback
    assert out.ids[0] == 0 and tok.eos_id not in out.ids[:2]


@pytest.mark.parametrize("kind", ["bpe-bos", "bpe", "sentencepiece"])
def test_the_fallback_chat_format_is_a_template_that_gives_the_trained_tokens(tmp_path, kind):
    """A tokenizer without a chat template gets fuyou's ChatML-style fallback. It is a Jinja template now, which
    an export writes as the model's: apply_chat_template with it gives exactly the tokens trained on, answers
    (content, <|im_end|>, EOS) with loss, the rest without (a new-user pass: the export carried no template)."""
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from fuyou.data import builtin_documents
    from fuyou.data.formats import Renderer
    from fuyou.data.tokenizer import HFTokenizer

    sys.path.insert(0, str(Path(__file__).parents[2] / "tools"))
    from make_tiny_checkpoint import make_tokenizer

    if kind == "sentencepiece":
        raw = Tokenizer(models.BPE(unk_token="<unk>"))
        raw.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
        raw.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
        raw.train_from_iterator(builtin_documents()[:20], trainers.BpeTrainer(
            vocab_size=400, show_progress=False, special_tokens=["<unk>", "<s>", "</s>"]))
        from tokenizers import processors

        raw.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
        PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>",
                                unk_token="<unk>").save_pretrained(tmp_path / "t")
    else:
        fast = make_tokenizer("llama3.1" if kind == "bpe-bos" else "qwen2.5", tmp_path / "t")
        fast.chat_template = None
        (tmp_path / "t" / "chat_template.jinja").unlink(missing_ok=True)
        cfg = json.loads((tmp_path / "t" / "tokenizer_config.json").read_text())
        cfg.pop("chat_template", None)
        (tmp_path / "t" / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = HFTokenizer(tmp_path / "t")
    assert tok.chat_template is None and tok.fallback_template
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
                {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And of Italy?"},
                {"role": "assistant", "content": "Rome."}]
    r = Renderer(tok, "auto", False)
    out = r({"messages": messages}, "x")
    assert r.stats.fallback_chats == 1
    hf = AutoTokenizer.from_pretrained(tmp_path / "t")
    assert out.ids == hf.apply_chat_template(messages, chat_template=tok.fallback_template, tokenize=True,
                                             return_dict=False)
    eos = tok.decode([tok.eos_id])
    assert tok.decode([i for i, f in zip(out.ids, out.loss) if f]).replace(" ", "") == \
        f"Paris.<|im_end|>\n{eos}Rome.<|im_end|>\n{eos}".replace(" ", "")
    text = hf.apply_chat_template(messages[:2], chat_template=tok.fallback_template, tokenize=False,
                                  add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\n"), text
    assert text.startswith("<|begin_of_text|><|im_start|>system\n" if kind == "bpe-bos" else
                           "<s><|im_start|>system\n" if kind == "sentencepiece" else "<|im_start|>system\n"), text


@pytest.mark.parametrize("trim", [False, True])
def test_a_prompts_trailing_space_is_never_an_answer_token(tmp_path, trim):
    """A ByteLevel tokenizer that trims offsets (trim_offsets) gives a lone trailing space an empty span at the
    next character, and leaves the space out of "Ġy": the prompt's space was trained as answer (a review).
    A token's characters now run from the end of the token before it."""
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from fuyou.data import builtin_documents
    from fuyou.data.formats import Renderer
    from fuyou.data.tokenizer import HFTokenizer

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.post_processor = processors.ByteLevel(trim_offsets=trim)
    raw.train_from_iterator(builtin_documents()[:40], trainers.BpeTrainer(
        vocab_size=600, show_progress=False, special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>").save_pretrained(tmp_path / "bl")
    tok = HFTokenizer(tmp_path / "bl")
    r = Renderer(tok, "auto", False)
    for prompt, answer in (("Mood: ", "\U0001F600"), ("Q: hi\nA: ", "yes")):
        out = r({"prompt": prompt, "completion": answer}, "x")
        learned = tok.decode([i for i, f in zip(out.ids, out.loss) if f])
        assert learned == answer + "<eos>", (prompt, learned)
        assert tok.decode([i for i, f in zip(out.ids, out.loss) if not f]) == prompt

def test_template_that_rewrites_earlier_turns_trains_the_last_only(tmp_path, hf_tok_dir):
    from fuyou.data.tokenizer import HFTokenizer

    # a template that renders earlier assistant turns differently (as Qwen3's drops reasoning)
    rewriting = ("{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}<|im_start|>assistant\n"
                 "[earlier]<|im_end|>\n{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tok = HFTokenizer(hf_tok_dir)
    tok.chat_template = rewriting
    tok._tok.chat_template = rewriting
    from fuyou.data.formats import Renderer

    r = Renderer(tok, "auto", False)
    out = r(CHAT[0], "x")
    answer = tok.decode([i for i, f in zip(out.ids, out.loss) if f])
    assert answer.replace(" ", "") == "Rome.<|im_end|>\n" and r.stats.last_turn_only == 1


@pytest.mark.parametrize("rec, message", [
    ({"foo": 1}, "none of the formats"),
    ({"messages": []}, "non-empty list"),
    ({"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "x"}]},
     r"messages\[0\]: 'content' is a JSON null; it must be a string \(null only in an assistant message that calls"),
    ({"messages": [{"role": "user"}]}, "'content' is missing"),
    ({"messages": [{"role": "assistant", "content": "x", "weight": 0.5}]}, "'weight' is 0.5; it must be 0"),
    ({"conversations": [{"from": "narrator", "value": "x"}]}, "from 'narrator', which is none of ShareGPT's"),
    ({"prompt": 3, "completion": "x"}, "field 'prompt' must be a string"),
])
def test_bad_records_are_refused_with_their_line(tmp_path, rec, message):
    f = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "completion": "b"}, rec])
    with pytest.raises(DataError, match=message) as e:
        tokenize_records([f], "byte")
    if "none of" not in message:
        assert "bad.jsonl:2" in str(e.value)


# -- packing ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["gpt-test", "llama-test"])
def test_a_packed_row_computes_what_each_example_computes_alone(tmp_path, family):
    d = tokenize_records([write_jsonl(tmp_path / "d.jsonl", qa_records(12))], "byte", val_fraction=0.1)
    rows = Rows.build(d.train, 192, True, d.pad_id, seed=0)
    assert len(rows) < len(d.train) - 2  # several examples per row
    model = StageModel(ModelConfig(**{**preset(family), "max_seq_len": 192}))
    params = model.init_params(0)
    b = rows.batch([0, 1])
    packed = float(model.forward_loss(params, b.tokens, b.targets, b.positions, loss_tokens=1))
    alone = 0.0
    for r in (0, 1):
        for k in rows.order[rows.ptr[r]:rows.ptr[r + 1]]:
            s, n = int(d.train.offsets[k]), int(rows.keep[k])
            t = torch.as_tensor(np.asarray(d.train.tokens[s:s + n], dtype=np.int64))[None]
            y = torch.where(torch.as_tensor(d.train.loss[s + 1:s + n] != 0)[None], t[:, 1:], IGNORE)
            alone += float(model.forward_loss(params, t[:, :-1], y, loss_tokens=1))
    assert packed == pytest.approx(alone, rel=1e-5)
    assert b.loss_tokens == sum(int(d.train.loss[d.train.offsets[k] + 1:d.train.offsets[k + 1]].sum())
                                for r in (0, 1) for k in rows.order[rows.ptr[r]:rows.ptr[r + 1]])


def test_padding_truncation_and_dropping(tmp_path):
    recs = [{"prompt": "p" * 50, "completion": "c" * 50}, {"prompt": "p" * 70, "completion": "c"},
            {"prompt": "x", "completion": "y"}]
    d = tokenize_records([write_jsonl(tmp_path / "d.jsonl", recs)], "byte", eval_paths=[tmp_path / "d.jsonl"])
    rows = Rows.build(d.train, 64, False, d.pad_id, seed=None)
    assert len(rows) == 2 and rows.truncated == 1 and rows.dropped == 1  # the 2nd lost its answer to the cut
    b = rows.batch([0, 1])
    assert b.positions is None and b.tokens.shape == (2, 64)
    assert int((b.targets[1] != IGNORE).sum()) == 2  # "y" and EOS; the padding carries none
    assert "1 longer than 65 tokens cut" in rows.report() and "1 dropped" in rows.report()
    # what the cut costs, in tokens and answer tokens (the 1st: 50 + 50 + EOS = 101 tokens, 51 answer ones, 65
    # kept; the 3rd: 3 tokens, 2 answer ones)
    assert "losing 36 of 104 tokens (35%) and 36 of 53 answer tokens (68%)" in rows.report(), rows.report()


def test_epochs_cover_every_row_once_per_epoch(tmp_path):
    from fuyou.data.examples import ExampleSampler

    d = tokenize_records([write_jsonl(tmp_path / "d.jsonl", qa_records(40))], "byte", val_fraction=0.1)
    rows = Rows.build(d.train, 32, False, d.pad_id, seed=3)
    s = ExampleSampler(rows, 4, seed=3)
    n = len(rows)
    seen = [tuple(s.batch(i).tokens[j].tolist()) for i in range(n // 4) for j in range(4)]
    assert len(set(seen)) == n // 4 * 4  # no row twice within an epoch
    assert torch.equal(s.batch(5).tokens, s.batch(5).tokens) and s.epochs(n) == pytest.approx(4.0)
    assert s.steps_for(2.0, 8) == -(-2 * n // 8)
    # each epoch is drawn again, as a function of (seed, epoch): the same rows in another order (the same order
    # every epoch passed every test: a mutation audit)
    def epoch(sampler, e):  # one sequence a batch: the epoch's rows in order
        return [tuple(sampler.batch(i).tokens[0].tolist()) for i in range(e * n, (e + 1) * n)]
    one = ExampleSampler(rows, 1, seed=3)
    first, second = epoch(one, 0), epoch(one, 1)
    assert sorted(first) == sorted(second) and first != second
    assert epoch(ExampleSampler(rows, 1, seed=3), 1) == second and epoch(ExampleSampler(rows, 1, seed=4), 1) != second


# -- prepared examples, CLI -----------------------------------------------------------------------------
def test_prepare_round_trip_and_report(tmp_path, capsys):
    from fuyou.cli import main

    src = write_jsonl(tmp_path / "qa.jsonl", qa_records(30))
    assert main(["data", "prepare", str(src), "--out", str(tmp_path / "prep")]) == 0
    out = capsys.readouterr().out
    assert "30 records (prompt_completion)" in out and "% of targets carry loss" in out
    d = load_data(DataConfig(path=[str(tmp_path / "prep")]))
    ref = tokenize_records([src], "byte")
    assert isinstance(d, ExampleData)
    assert np.array_equal(np.asarray(d.train.tokens), ref.train.tokens)
    assert np.array_equal(np.asarray(d.train.loss), ref.train.loss)
    (tmp_path / "prep" / "train.loss.bin").write_bytes(b"\0")  # truncated
    with pytest.raises(DataError, match="truncated"):
        load_data(DataConfig(path=[str(tmp_path / "prep")]))


def test_written_examples_keep_their_masks(tmp_path):
    d = tokenize_records([write_jsonl(tmp_path / "c.jsonl", CHAT * 3)], "byte", val_fraction=0.3)
    write_examples(tmp_path / "p", d)
    meta = json.loads((tmp_path / "p" / "meta.json").read_text())
    back = read_examples(tmp_path / "p", meta)
    for a, b in ((d.train, back.train), (d.val, back.val)):
        assert np.array_equal(a.tokens, np.asarray(b.tokens)) and np.array_equal(a.loss, np.asarray(b.loss))
        assert np.array_equal(a.offsets, np.asarray(b.offsets))
    assert back.fingerprint == "byte" and meta["info"]["formats"] == {"messages": 6}


# -- training -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", [
    ["model.preset=llama-test", "model.n_layer=4", "train.grad_accum=2", "train.grad_clip=0.5"],
    ["model.n_layer=4", "data.packing=false", "offload.resident_mem=0", "offload.cache_weights=false"],
])
def test_engine_equals_reference_on_packed_masked_data(tmp_path, case):
    recs = qa_records(60) + CHAT * 5
    src = write_jsonl(tmp_path / "d.jsonl", recs)
    cfg = make_cfg(tmp_path, f"data.path={src}", "data.seq_len=48", "train.steps=3", *case)
    ref, eng, rs, es = run_both(cfg)
    try:
        assert all(0 < s.loss_tokens < 2 * 48 * cfg.train.grad_accum for s in rs)
        assert [s.loss_tokens for s in rs] == [s.loss_tokens for s in es]
        assert_same_training(ref, eng, rs, es)
    finally:
        eng.close()


def test_epochs_and_metrics_lines(tmp_path):
    from fuyou.train.loop import run_training

    src = write_jsonl(tmp_path / "d.jsonl", qa_records(40))
    held = write_jsonl(tmp_path / "e.jsonl", qa_records(6, seed=9))
    cfg = load_config(overrides=["model.preset=gpt-test", f"data.path={src}", f"data.eval_path={held}",
                                 "data.seq_len=64", "train.micro_batch_size=4", "train.epochs=2", "train.log_every=1",
                                 "train.eval_every=0", "train.lr_schedule=linear", f"run.out_dir={tmp_path / 'runs'}",
                                 "run.name=ep"])
    res = run_training(cfg)
    lines = [json.loads(x) for x in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if "loss" in x]
    assert steps[-1]["epoch"] == pytest.approx(2.0, abs=4 / 40 * 2)
    assert all("time" in x and "tokens" in x for x in lines if "summary" not in x)
    assert steps[1]["tokens"] == 2 * 4 * 64 and all(x["loss_tokens"] > 0 for x in steps)
    toml = (res.run_dir / "config.toml").read_text()
    assert "epochs = 2.0" in toml and "\nsteps =" not in toml
    load_config(res.run_dir / "config.toml")  # repeats the run: epochs without a conflicting steps


def test_steps_and_epochs_together_are_refused():
    with pytest.raises(ConfigError, match="both given"):
        load_config(overrides=["train.steps=10", "train.epochs=1"])


def test_eval_loss_is_a_mean_over_target_tokens(tmp_path):
    from fuyou.train.reference import ReferenceTrainer

    src = write_jsonl(tmp_path / "d.jsonl", qa_records(30))
    cfg = load_config(overrides=["model.preset=gpt-test", f"data.path={src}", f"data.eval_path={src}",
                                 "data.seq_len=64", "train.micro_batch_size=3", "train.eval_batches=100",
                                 "train.precision=fp32"])
    tr = ReferenceTrainer(cfg, load_data(cfg.data))
    total = count = 0.0
    for b in tr.eval_batches:
        with torch.no_grad():
            ce = torch.nn.functional.cross_entropy(tr.model.logits(tr.params, b.tokens, b.positions).flatten(0, 1),
                                                   b.targets.flatten(), ignore_index=IGNORE, reduction="sum")
        total, count = total + float(ce), count + b.loss_tokens
    assert tr.evaluate() == pytest.approx(total / count, rel=1e-5)


# -- the data must be the model's tokenizer's ----------------------------------------------------------
def test_data_of_another_tokenizer_is_refused(tmp_path):
    pytest.importorskip("transformers")
    from hf_testutil import make_hf_model

    from fuyou.cli import main

    model = make_hf_model(tmp_path / "llama", "llama")
    src = write_jsonl(tmp_path / "qa.jsonl", qa_records(20))
    base = [f"model.init_from={model}", "data.seq_len=32", "train.steps=1", f"run.out_dir={tmp_path / 'runs'}"]
    with pytest.raises(ConfigError, match="data.tokenizer='byte' but model.init_from"):
        load_config(overrides=base + [f"data.path={src}", "data.tokenizer=byte"])
    assert main(["data", "prepare", str(src), "--out", str(tmp_path / "bytes")]) == 0
    from fuyou.train.loop import build_trainer

    cfg = load_config(overrides=base + [f"data.path={tmp_path / 'bytes'}"])
    with pytest.raises(DataError, match="tokenized byte by byte"):
        build_trainer(cfg, "x")
    other = tmp_path / "other"
    other.mkdir()
    from hf_testutil import make_tokenizer

    make_tokenizer(other)  # the same trainer on the same text: the same vocabulary
    assert main(["data", "prepare", str(src), "--out", str(tmp_path / "same"), "--tokenizer", str(other)]) == 0
    build_trainer(load_config(overrides=base + [f"data.path={tmp_path / 'same'}"]), "y").close()
    meta = json.loads((tmp_path / "same" / "meta.json").read_text())
    assert meta["tokenizer"] == f"hf:{other.resolve()}"  # absolute: data.eval_path re-reads it from anywhere
    meta["tokenizer_fingerprint"] = "300:0123456789abcdef"
    (tmp_path / "same" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="prepare the data again with --tokenizer"):
        build_trainer(load_config(overrides=base + [f"data.path={tmp_path / 'same'}"]), "z")


@pytest.mark.timeout(300)
def test_a_resume_refuses_data_of_another_vocabulary(tmp_path, capsys):
    """A resume reads no checkpoint, so the data's tokenizer was not compared with anything: data prepared
    again at the run's path with another tokenizer (or another data.tokenizer) trained the model on token
    ids of another vocabulary in silence, and its export shipped the first tokenizer (a new-user pass). The
    run records its data's vocabulary, and a resume refuses data of another, with nothing changed."""
    pytest.importorskip("transformers")
    from hf_testutil import make_hf_model

    from fuyou.cli import main
    from fuyou.train.run import DATA_FILES

    model = make_hf_model(tmp_path / "llama", "llama")
    src = write_jsonl(tmp_path / "qa.jsonl", qa_records(20))
    (tmp_path / "ssd").mkdir()
    base = ["--offload", "ssd", "--ssd", str(tmp_path / "ssd"), "--cpu-mem", "256MiB", "data.seq_len=32",
            "train.steps=1", "train.precision=fp32", "offload.keep_state=true", f"run.out_dir={tmp_path / 'runs'}"]
    assert main(["data", "prepare", str(src), "--out", str(tmp_path / "data"), "--tokenizer", str(model)]) == 0
    assert main(["train", "--init-from", str(model), *base, f"data.path={tmp_path / 'data'}", "run.name=p"]) == 0
    run = tmp_path / "runs" / "p"
    assert json.loads((run / DATA_FILES).read_text())["vocabulary"].startswith("300:")
    assert main(["data", "prepare", str(src), "--out", str(tmp_path / "data")]) == 0  # replaced: byte ids
    state = sorted((p.name, p.stat().st_size) for p in (tmp_path / "ssd").rglob("*"))
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "train.steps=2"]) == 2
    assert re.search(r"trained on data tokenized with hf:.*Prepare the data again with the run's tokenizer "
                     r"\(`fuyou data prepare \.\.\. --tokenizer .*llama", capsys.readouterr().err)
    assert sorted((p.name, p.stat().st_size) for p in (tmp_path / "ssd").rglob("*")) == state
    assert "resumed" not in (run / "metrics.jsonl").read_text()
    # text data: another data.tokenizer
    assert main(["train", "--init-from", str(model), *base, f"data.path={src}", "run.name=t"]) == 0
    assert main(["train", "--resume", str(tmp_path / "runs" / "t"), "train.steps=2", "data.tokenizer=byte"]) == 2
    assert re.search(r"the data was tokenized with byte .*Resume with the run's own data\.tokenizer",
                     capsys.readouterr().err)
    record = tmp_path / "runs" / "t" / DATA_FILES
    rec = json.loads(record.read_text())
    record.write_text(json.dumps({**rec, "vocabulary": "300:0123456789abcdef"}))  # as if the tokenizer was edited
    assert main(["train", "--resume", str(tmp_path / "runs" / "t"), "train.steps=2"]) == 2
    assert "has another vocabulary now" in capsys.readouterr().err
    record.write_text(json.dumps(rec))
    assert main(["train", "--resume", str(tmp_path / "runs" / "t"), "train.steps=2"]) == 0  # its own: resumes
    # held-out files added on a resume: data.val_fraction's held-out examples would be trained on (a pass)
    assert main(["train", "--resume", str(tmp_path / "runs" / "t"), "train.steps=3", f"data.eval_path={src}"]) == 2
    assert "cannot add data.eval_path" in capsys.readouterr().err
    # the built-in corpus has no data files, and its run recorded nothing to compare (a pass)
    assert main(["train", "--init-from", str(model), *base, "data.source=builtin", "run.name=b"]) == 0
    assert main(["train", "--resume", str(tmp_path / "runs" / "b"), "train.steps=2", "data.tokenizer=byte"]) == 2
    assert "the data was tokenized with byte" in capsys.readouterr().err


# -- inputs a new-user pass found mishandled -------------------------------------------------------------
def test_no_usable_held_out_example_turns_evaluation_off_with_a_note(tmp_path, capsys):
    """Every held-out prompt longer than data.seq_len: no row at all (it was one empty row, whose mean
    loss divided by zero), evaluation off, and a note that says why."""
    from fuyou.data.batches import make_batches

    train = write_jsonl(tmp_path / "t.jsonl", qa_records(8))
    held = write_jsonl(tmp_path / "h.jsonl", [{"prompt": "p" * 200, "completion": "c"}])
    d = tokenize_records([train], "byte", eval_paths=[held])
    assert len(Rows.build(d.val, 64, True, d.pad_id, None)) == 0
    assert len(Rows.build(d.val, 64, False, d.pad_id, None)) == 0
    cfg = make_cfg(tmp_path, "data.seq_len=64", f"data.path={train}", f"data.eval_path={held}")
    _, evals = make_batches(cfg, d)
    assert evals is None and "evaluation is off" in capsys.readouterr().err


def test_a_json_array_is_read_as_records_and_other_formats_are_refused(tmp_path):
    """Alpaca ships a .json array: its records are read as records. Tables, archives and binary files
    are refused by name, not trained on as text; non-UTF-8 text and lone surrogates are refused with
    where they are."""
    recs = qa_records(6)
    arr = tmp_path / "a.json"
    arr.write_text(json.dumps(recs))
    lines = tmp_path / "lines.json"  # JSON Lines under a .json name
    lines.write_text("".join(json.dumps(r) + "\n" for r in recs))
    ref = tokenize_records([write_jsonl(tmp_path / "a.jsonl", recs)], "byte", val_fraction=0.2)
    for f in (arr, lines):
        d = tokenize_records([f], "byte", val_fraction=0.2)
        assert np.array_equal(np.asarray(d.train.tokens), np.asarray(ref.train.tokens))
    (tmp_path / "d.parquet").write_bytes(b"PAR1\x00\x01binary")
    with pytest.raises(DataError, match="parquet file.*pandas.read_parquet"):
        tokenize_records([tmp_path / "d.parquet"], "byte")
    (tmp_path / "obj.json").write_text('{"data": []}')
    with pytest.raises(DataError, match="array of example objects"):
        tokenize_records([tmp_path / "obj.json"], "byte")
    (tmp_path / "l1.txt").write_bytes("caf\xe9".encode("latin1"))
    with pytest.raises(DataError, match="l1.txt: not UTF-8 text"):
        tokenize_records([tmp_path / "l1.txt"], "byte")
    (tmp_path / "s.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "Q \\ud800 x", "completion": "A"}\n')
    with pytest.raises(DataError, match=r"s.jsonl:2: holds \\ud800"):
        tokenize_records([tmp_path / "s.jsonl"], "byte")
    upper = tmp_path / "up"
    upper.mkdir()
    (upper / "A.JSONL").write_text(json.dumps(recs[0]) + "\n")
    d = tokenize_records([upper], "byte", val_fraction=0.5)  # read, not "holds no usable files"
    assert len(d.train) + len(d.val) == 1


def test_a_template_that_refuses_a_conversation_names_its_line(tmp_path, hf_tok_dir):
    """Mistral's and Llama 2's templates raise on roles that do not alternate: the error names the
    record's file:line. A conversation that opens with the assistant trains that turn (no prompt)."""
    import shutil

    strict = tmp_path / "strict"
    shutil.copytree(hf_tok_dir, strict)
    cfg = json.loads((strict / "tokenizer_config.json").read_text())
    cfg["chat_template"] = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                            "{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}"
                            "{{ m['content'] }}\n{% endfor %}")
    (strict / "tokenizer_config.json").write_text(json.dumps(cfg))
    recs = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
            {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                          {"role": "assistant", "content": "c"}]}]
    with pytest.raises(DataError, match=r"c.jsonl:2: .*roles must alternate"):
        tokenize_records([write_jsonl(tmp_path / "c.jsonl", recs)], str(strict))
    first = [{"messages": [{"role": "assistant", "content": "Hello."}, {"role": "user", "content": "hi"},
                           {"role": "assistant", "content": "Paris."}]}]
    d = tokenize_records([write_jsonl(tmp_path / "f.jsonl", first)], str(hf_tok_dir), eval_paths=[tmp_path / "f.jsonl"])
    assert int(np.asarray(d.train.loss).sum()) > 0


# -- chat data as users have it (a second new-user pass) ---------------------------------------------------
def _answers(d, tok, k=0) -> str:
    ex = d.train
    s, e = int(ex.offsets[k]), int(ex.offsets[k + 1])
    return tok.decode([int(t) for t, f in zip(ex.tokens[s + 1:e], ex.loss[s + 1:e]) if f])


def _template_dir(tmp_path, hf_tok_dir, template: str, name: str) -> Path:
    import shutil

    d = tmp_path / name
    shutil.copytree(hf_tok_dir, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = template
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return d


# Qwen2.5's shape: a default system prompt when the conversation has none
WITH_SYSTEM = ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful bot.<|im_end|>\n"
               "{% endif %}" + CHATML)


@pytest.mark.parametrize("template", ["chatml", "default-system"])
def test_a_conversation_opening_with_the_assistant_trains_only_its_content(tmp_path, hf_tok_dir, template):
    """The opening assistant turn had no prompt to subtract: the template's header (and Qwen's default
    system prompt) carried loss. Now only the content and its end-of-turn marker do."""
    from fuyou.data.tokenizer import HFTokenizer

    tok_dir = hf_tok_dir if template == "chatml" else _template_dir(tmp_path, hf_tok_dir, WITH_SYSTEM, "sys")
    rec = {"messages": [{"role": "assistant", "content": "Hello, how can I help?"},
                        {"role": "user", "content": "Capital?"}, {"role": "assistant", "content": "Paris."}]}
    f = write_jsonl(tmp_path / "a.jsonl", [rec])
    d = tokenize_records([f], str(tok_dir), eval_paths=[f])
    got = _answers(d, HFTokenizer(tok_dir)).replace(" ", "")
    assert got == "Hello,howcanIhelp?<|im_end|>\nParis.<|im_end|>\n", got
    fb = tokenize_records([f], "byte", eval_paths=[f])  # the fallback format: the same answers
    assert loss_text(fb.train, 0)[0] == "Hello, how can I help?<|im_end|>\nParis.<|im_end|>\n"


def test_weight_zero_turns_and_conversations_without_an_answer_are_not_trained(tmp_path, capsys):
    """OpenAI's per-message weight: 0 takes the turn's loss away. A conversation with nothing to learn is
    skipped and counted (it aborted the whole file); a file of nothing but those is refused."""
    recs = [{"messages": [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "BAD", "weight": 0},
                          {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "GOOD", "weight": 1}]},
            {"messages": [{"role": "user", "content": "lonely"}]},
            {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "no", "weight": 0}]},
            {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}], "id": 7}]
    f = write_jsonl(tmp_path / "w.jsonl", recs)
    d = tokenize_records([f], "byte", eval_paths=[f])
    assert len(d.train) == 2 and d.info["skipped_no_answer"] == 2  # (the same file held out: counted once)
    assert loss_text(d.train, 0)[0] == "GOOD<|im_end|>\n"
    err = capsys.readouterr().err
    assert "2 conversation(s) with no assistant turn to learn" in err and "w.jsonl:2" in err
    with pytest.raises(DataError, match="holds no usable example"):
        tokenize_records([write_jsonl(tmp_path / "none.jsonl", recs[1:3])], "byte")


def test_sharegpt_and_trl_conversations_read_as_messages(tmp_path):
    """ShareGPT's {"conversations": [{"from", "value"}]} and TRL's conversational prompt/completion give
    the tokens and masks of the same conversation written as messages."""
    msgs = CHAT[0]["messages"]
    who = {"system": "system", "user": "human", "assistant": "gpt"}
    share = {"conversations": [{"from": who[m["role"]], "value": m["content"]} for m in msgs]}
    shouted = {"conversations": [{"from": who[m["role"]].upper(), "value": m["content"]} for m in msgs]}  # ("Human")
    # TRL: the prompt's turns carry no loss, the completion's assistant turns do
    trl = {"prompt": msgs[:4], "completion": msgs[4:]}
    ref = tokenize_records([f := write_jsonl(tmp_path / "m.jsonl", [CHAT[0]])], "byte", eval_paths=[f])
    for name, rec in (("s", share), ("S", shouted), ("t", trl)):
        g = write_jsonl(tmp_path / f"{name}.jsonl", [rec])
        d = tokenize_records([g], "byte", eval_paths=[g])
        assert np.array_equal(np.asarray(d.train.tokens), np.asarray(ref.train.tokens)), name
        want = "Rome.<|im_end|>\n" if name == "t" else loss_text(ref.train, 0)[0]
        assert loss_text(d.train, 0)[0] == want, name


TOOLS = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m.get('tool_calls') %}{% for c in m['tool_calls'] %}"
         "<call>{{ c['function']['name'] }}({{ c['function']['arguments'] }})</call>{% endfor %}{% else %}"
         "{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
         "{% endif %}")


def test_tool_calls_are_trained_where_the_template_writes_them_and_refused_where_they_would_vanish(
        tmp_path, hf_tok_dir, capsys):
    from fuyou.data.tokenizer import HFTokenizer

    call = {"type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}
    rec = {"messages": [{"role": "user", "content": "Weather in Paris?"},
                        {"role": "assistant", "content": None, "tool_calls": [call]},
                        {"role": "tool", "tool_call_id": "1", "content": "sunny"},
                        {"role": "assistant", "content": "Sunny.", "refusal": None}]}
    f = write_jsonl(tmp_path / "t.jsonl", [rec])
    tools = _template_dir(tmp_path, hf_tok_dir, TOOLS, "tools")
    d = tokenize_records([f], str(tools), eval_paths=[f])
    got = _answers(d, HFTokenizer(tools)).replace(" ", "")
    assert got == '<call>weather({"city":"Paris"})</call><|im_end|>\nSunny.<|im_end|>\n', got
    assert "'refusal' (1x)" in capsys.readouterr().err  # an ignored key is counted
    with pytest.raises(DataError, match="does not render them: the turn would be trained as an empty answer"):
        tokenize_records([f], str(hf_tok_dir))  # CHATML writes content only
    with pytest.raises(DataError, match="fallback chat format .* cannot write"):
        tokenize_records([f], "byte")


def test_files_are_read_by_what_they_hold_and_a_directory_says_what_it_skips(tmp_path, capsys):
    recs = qa_records(4)
    (tmp_path / "c.ndjson").write_text("".join(json.dumps(r) + "\n" for r in recs))
    d = tokenize_records([tmp_path / "c.ndjson"], "byte", val_fraction=0.25)
    assert d.info["formats"] == {"prompt_completion": 4}  # records, not one document of JSON syntax
    for name in ("c.txt", "noext"):
        (tmp_path / name).write_text((tmp_path / "c.ndjson").read_text())
        with pytest.raises(DataError, match="looks like JSON Lines .* rename it to .jsonl"):
            tokenize_records([tmp_path / name], "byte")
    top = tmp_path / "dir"
    (top / ".ipynb_checkpoints").mkdir(parents=True)
    write_jsonl(top / "a.jsonl", recs)
    write_jsonl(top / ".ipynb_checkpoints" / "a-checkpoint.jsonl", recs)
    (top / "b.json").write_text(json.dumps(recs))
    (top / "c.csv").write_text("prompt,completion\n")
    (top / "notes.md").write_text((tmp_path / "c.ndjson").read_text())  # JSON Lines by another name: not read
    d = tokenize_records([top], "byte", val_fraction=0.25)
    assert len(d.train) + len(d.val) == 4  # the hidden copy is not read twice
    err = capsys.readouterr().err
    assert "4 file(s) not read" in err and "b.json" in err and "c.csv" in err and "hidden" in err
    assert "notes.md (it looks like JSON Lines: rename it to .jsonl" in err
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    write_jsonl(mixed / "a.jsonl", recs)
    (mixed / "b.txt").write_text("plain prose")
    with pytest.raises(DataError, match=r"b.txt is plain text, but the first record \(.*a.jsonl:1\) is "
                                        r"prompt_completion data"):
        tokenize_records([mixed], "byte")


def test_settings_prepared_data_fixed_are_refused_not_ignored(tmp_path, capsys):
    """data.train_on_prompt, val_fraction, format and tokenizer given for prepared data changed nothing and
    were recorded in the run's config as if they had: now refused with how to get them."""
    from fuyou.cli import main

    src = write_jsonl(tmp_path / "qa.jsonl", qa_records(30))
    assert main(["data", "prepare", str(src), "--out", str(tmp_path / "prep")]) == 0
    prep = str(tmp_path / "prep")
    load_data(DataConfig(path=[prep]))  # as prepared: fine, and the share of answer tokens is said
    assert "% of targets carry loss" in capsys.readouterr().err
    for extra, named in (({"train_on_prompt": True}, "data.train_on_prompt=true (prepared with false"),
                         ({"val_fraction": 0.2}, "data.val_fraction=0.2"),
                         ({"format": "alpaca"}, "data.format=alpaca (--format)"),
                         ({"tokenizer": str(tmp_path)}, "data.tokenizer=")):
        with pytest.raises(DataError, match="prepared data: `fuyou data prepare` fixed these") as e:
            load_data(DataConfig(path=[prep], **extra))
        assert named in str(e.value), str(e.value)


def test_too_little_held_out_turns_evaluation_off_and_a_step_larger_than_the_data_is_said(tmp_path, capsys):
    from fuyou.data.batches import make_batches

    one = write_jsonl(tmp_path / "one.jsonl", qa_records(1))
    cfg = make_cfg(tmp_path, f"data.path={one}", "train.micro_batch_size=4", "data.seq_len=128",
                   "model.max_seq_len=128")
    sampler, evals = make_batches(cfg, load_data(cfg.data))
    err = capsys.readouterr().err
    assert evals is None and "no example is held out (1 in all" in err and "answer token within" not in err
    assert "makes 1 rows of 128 tokens and a step draws 4" in err
    text = tmp_path / "t.txt"
    text.write_text("word " * 400)
    cfg = make_cfg(tmp_path, f"data.path={text}", "data.val_fraction=0.01")
    sampler, evals = make_batches(cfg, load_data(cfg.data))  # 20 held-out tokens: no evaluation, training goes on
    assert evals is None and "evaluation is off; raise data.val_fraction" in capsys.readouterr().err


# -- a review of the above found these -----------------------------------------------------------------
def test_data_prepared_with_train_on_prompt_trains_as_prepared(tmp_path):
    from fuyou.cli import main

    src = write_jsonl(tmp_path / "qa.jsonl", qa_records(20))
    assert main(["data", "prepare", str(src), "--out", str(tmp_path / "p"), "--train-on-prompt"]) == 0
    load_data(DataConfig(path=[str(tmp_path / "p")]))  # unset: as prepared (it was refused as "false")
    load_data(DataConfig(path=[str(tmp_path / "p")], train_on_prompt=True))
    with pytest.raises(DataError, match="data.train_on_prompt=false \\(prepared with true"):
        load_data(DataConfig(path=[str(tmp_path / "p")], train_on_prompt=False))
    load_data(DataConfig(path=[str(tmp_path / "p")], train_on_prompt=False), check_prepared=False)  # a resume


THINKS = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m.get('reasoning_content') %}<think>"
          "{{ m['reasoning_content'] }}</think>{% endif %}{{ m['content'] | trim }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_every_message_key_reaches_the_template_and_an_opening_turn_is_split_by_the_template(
        tmp_path, hf_tok_dir, capsys):
    """reasoning_content was cut before the template (its thinking lost its loss); the opening assistant
    turn was found by searching its content, which a trimming template or a short content defeated."""
    from fuyou.data.tokenizer import HFTokenizer

    tok_dir = _template_dir(tmp_path, hf_tok_dir, THINKS, "think")
    tok = HFTokenizer(tok_dir)
    recs = [{"messages": [{"role": "user", "content": "Q"},
                          {"role": "assistant", "content": "A", "reasoning_content": "hmm", "mood": "x"}]},
            {"messages": [{"role": "assistant", "content": "  d  "}, {"role": "user", "content": "q"},
                          {"role": "assistant", "content": "e"}]}]
    f = write_jsonl(tmp_path / "r.jsonl", recs)
    d = tokenize_records([f], str(tok_dir), eval_paths=[f])
    assert _answers(d, tok, 0).replace(" ", "") == "<think>hmm</think>A<|im_end|>\n"
    assert _answers(d, tok, 1).replace(" ", "") == "d<|im_end|>\ne<|im_end|>\n"
    err = capsys.readouterr().err
    assert "'mood' (1x)" in err and "reasoning_content" not in err  # written by the template: not ignored
    c = tokenize_records([write_jsonl(tmp_path / "d.jsonl", [{"messages": [
        {"role": "assistant", "content": "d"}, {"role": "user", "content": "q"}]}])], str(hf_tok_dir),
        eval_paths=[tmp_path / "d.jsonl"])  # CHATML: content "d" also spelled in its end marker
    assert _answers(c, HFTokenizer(hf_tok_dir)).replace(" ", "") == "d<|im_end|>\n"


def test_weights_under_train_on_prompt_and_templates_that_rewrite_earlier_turns(tmp_path, hf_tok_dir):
    from fuyou.data.formats import Renderer
    from fuyou.data.tokenizer import HFTokenizer

    conv = {"messages": [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "GOOD"},
                         {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "BAD", "weight": 0}]}
    r = Renderer(ByteTokenizer(), "auto", True)  # train_on_prompt: all but the weight-0 turn
    out = r(conv, "x")
    assert "BAD" not in ByteTokenizer().decode([i for i, f in zip(out.ids, out.loss) if f])
    assert "Q2" in ByteTokenizer().decode([i for i, f in zip(out.ids, out.loss) if f])
    assert r({"messages": [{"role": "user", "content": "only a question"}]}, "y") is not None  # prompts carry loss
    rewriting = ("{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}<|im_start|>assistant\n"
                 "[earlier]<|im_end|>\n{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                 "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tok = HFTokenizer(hf_tok_dir)
    tok.chat_template = tok._tok.chat_template = rewriting
    r = Renderer(tok, "auto", False)
    out = r(conv, "z")  # the last turn has weight 0: the last one of weight 1 is trained, not the record skipped
    assert out is not None and tok.decode([i for i, f in zip(out.ids, out.loss) if f]).replace(" ", "") == \
        "GOOD<|im_end|>\n"


def test_the_records_tool_schemas_reach_the_template(tmp_path, hf_tok_dir):
    """OpenAI's record-level "tools" were dropped: calls were learnt without the schemas in the prompt."""
    from fuyou.data.tokenizer import HFTokenizer

    tools_tpl = "{% if tools %}<tools>{{ tools | tojson }}</tools>\n{% endif %}" + TOOLS
    tok_dir = _template_dir(tmp_path, hf_tok_dir, tools_tpl, "tools2")
    schema = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}
    call = {"type": "function", "function": {"name": "weather", "arguments": "{}"}}
    rec = {"tools": [schema], "messages": [{"role": "user", "content": "Weather?"},
                                           {"role": "assistant", "content": None, "tool_calls": [call]}]}
    f = write_jsonl(tmp_path / "t.jsonl", [rec, {**rec, "tools": json.dumps([schema])}])  # (LLaMA-Factory: a string)
    d = tokenize_records([f], str(tok_dir), eval_paths=[f])
    tok = HFTokenizer(tok_dir)
    for k in (0, 1):
        s, e = int(d.train.offsets[k]), int(d.train.offsets[k + 1])
        text = tok.decode([int(t) for t in d.train.tokens[s:e]])
        assert '"name": "weather"' in text.split("<|im_start|>")[0].replace('":"', '": "'), text  # the schema
        assert _answers(d, tok, k).replace(" ", "") == "<call>weather({})</call><|im_end|>\n"  # no loss on it
    with pytest.raises(DataError, match="does not write them: the model would learn its calls without the schemas"):
        tokenize_records([f], str(_template_dir(tmp_path, hf_tok_dir, TOOLS, "notools")))
    with pytest.raises(DataError, match="'tools' .* fallback chat format"):
        tokenize_records([f], "byte")


def test_a_copy_of_the_prepared_tokenizer_is_the_same_tokenizer(tmp_path, hf_tok_dir):
    import shutil

    from fuyou.cli import main

    src = write_jsonl(tmp_path / "qa.jsonl", qa_records(10))
    assert main(["data", "prepare", str(src), "--out", str(tmp_path / "p"), "--tokenizer", str(hf_tok_dir)]) == 0
    shutil.copytree(hf_tok_dir, tmp_path / "copy")
    load_data(DataConfig(path=[str(tmp_path / "p")], tokenizer=str(tmp_path / "copy")))  # the same vocabulary
    with pytest.raises(DataError, match="data.tokenizer=byte"):
        load_data(DataConfig(path=[str(tmp_path / "p")], tokenizer="byte"))


def test_may_pack_is_true_only_for_records(tmp_path):
    """Whether rows may pack several examples (attention then takes a mask the activation estimates count):
    records (.jsonl/.ndjson in any case, a .json file by name, a directory holding them, a prepared
    directory of examples), not text or a token stream."""
    from fuyou.data.config import DataConfig

    for name in ("a.jsonl", "b.NDJSON", "c.json"):
        (tmp_path / name).write_text('{"prompt": "q", "completion": "a"}\n')
        assert DataConfig(path=[str(tmp_path / name)]).may_pack, name
    (tmp_path / "t.txt").write_text("plain text")
    assert not DataConfig(path=[str(tmp_path / "t.txt")]).may_pack
    assert not DataConfig(path=[str(tmp_path / "t.txt")], format="prompt_completion", packing=False).may_pack
    assert DataConfig(path=[str(tmp_path)]).may_pack  # (a directory with records)
    assert not DataConfig().may_pack  # the embedded corpus


REWRITES_EARLIER = ("{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}<|im_start|>assistant\n"
                    "[earlier]{{ m['content'][-4:] }}<|im_end|>\n{% else %}<|im_start|>{{ m['role'] }}\n"
                    "{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
                    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_train_on_prompt_never_gives_a_weight_0_turn_loss_under_a_rewriting_template(hf_tok_dir):
    """With data.train_on_prompt=true and a template that rewrites earlier turns (as Qwen3's drops their
    thinking), the whole rewritten history carried loss, a weight-0 turn's text in it too (a new-user pass:
    "SECRET" was learnt). Such a history is now prompt without loss, counted in a note; a conversation with no
    turn of weight 1 there is left out. TRL's conversational prompt carries loss with train_on_prompt too,
    but for its weight-0 assistant turns (it carried none at all)."""
    from fuyou.data.formats import Renderer
    from fuyou.data.tokenizer import HFTokenizer

    tok = HFTokenizer(hf_tok_dir)
    tok.chat_template = tok._tok.chat_template = REWRITES_EARLIER

    def learned(r, rec):
        out = r(rec, "x")
        return None if out is None else tok.decode([i for i, f in zip(out.ids, out.loss) if f]).replace(" ", "")

    secret = {"messages": [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "SECRET", "weight": 0},
                           {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]}
    r = Renderer(tok, "auto", True)
    assert learned(r, secret) == "A2<|im_end|>\n" and r.stats.rewritten_weight0 == 1
    assert "despite data.train_on_prompt" in " ".join(r.stats.notes())
    plain = {"messages": [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "FIRST"},
                          {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]}
    assert "Q1" in learned(r, plain) and "Q2" in learned(r, plain)  # (no weight-0 turn: the history carries loss)
    only_silent = {"messages": [*secret["messages"][:3], {"role": "assistant", "content": "NO", "weight": 0}]}
    assert learned(r, only_silent) is None and r.stats.rewritten_weight0 == 2
    trl = {"prompt": [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "PREV"},
                      {"role": "user", "content": "Q2"}],
           "completion": [{"role": "assistant", "content": "A2"}]}
    assert "PREV" in learned(Renderer(tok, "auto", True), trl) and "Q1" in learned(Renderer(tok, "auto", True), trl)
    assert learned(Renderer(tok, "auto", False), trl) == "A2<|im_end|>\n"


def test_a_template_whose_prefix_differs_is_refused_with_advice_that_works(hf_tok_dir):
    """A template whose rendering of the prompt is not a prefix of the conversation's was refused with
    "Set data.train_on_prompt=true", which was refused the same way (a new-user pass). With train_on_prompt
    every token carries loss, so it now trains the conversation whole; without, the advice is that."""
    from fuyou.data.formats import Renderer
    from fuyou.data.tokenizer import HFTokenizer
    from fuyou.errors import DataError

    tok = HFTokenizer(hf_tok_dir)
    odd = ("{% for m in messages %}<|im_start|>{{ m['role'] }}{% if loop.last %}!{% endif %}\n{{ m['content'] }}"
           "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tok.chat_template = tok._tok.chat_template = odd
    conv = {"messages": [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}]}
    with pytest.raises(DataError, match="Set data.train_on_prompt=true"):
        Renderer(tok, "auto", False)(conv, "x")
    out = Renderer(tok, "auto", True)(conv, "x")
    assert all(out.loss) and "A1" in tok.decode(out.ids)
    silent = {"messages": [conv["messages"][0], {**conv["messages"][1], "weight": 0}, {"role": "user", "content": "Q"},
                           {"role": "assistant", "content": "A2"}]}
    with pytest.raises(DataError, match="Use a prompt/completion file") as e:
        Renderer(tok, "auto", True)(silent, "x")
    assert "train_on_prompt=true" not in str(e.value)


@pytest.mark.parametrize("kind", ["examples", "text"])
def test_prepared_data_records_its_held_out_share_and_takes_the_same_again(tmp_path, kind):
    """Data prepared with --val-fraction 0.3 and trained with data.val_fraction=0.3 was refused ("training
    would ignore" it), and an explicit data.val_fraction=0.05 was taken in silence (a new-user pass): the
    share a preparation held out was not recorded. It is now (meta.json), and a setting is compared with it."""
    from fuyou.cli import main

    if kind == "examples":
        src = write_jsonl(tmp_path / "qa.jsonl", qa_records(30))
    else:
        src = tmp_path / "t.txt"
        src.write_text("some words " * 300)
    assert main(["data", "prepare", str(src), "--out", str(tmp_path / "p"), "--val-fraction", "0.3"]) == 0
    prep = str(tmp_path / "p")
    assert json.loads((tmp_path / "p" / "meta.json").read_text()).get("val_fraction", (
        json.loads((tmp_path / "p" / "meta.json").read_text()).get("info", {}).get("val_fraction"))) == 0.3
    load_data(DataConfig(path=[prep], val_fraction=0.3))  # the same: taken
    load_data(DataConfig(path=[prep]))  # unset: as prepared
    with pytest.raises(DataError, match=r"data.val_fraction=0.05 \(prepared with 0.3"):
        load_data(DataConfig(path=[prep], val_fraction=0.05))


def test_a_run_on_prepared_data_records_the_share_the_preparation_held_out(tmp_path):
    """data.val_fraction unset over data prepared with --val-fraction 0.3: the run's config.toml said 0.05
    (found by review)."""
    from fuyou.cli import main

    src = write_jsonl(tmp_path / "qa.jsonl", qa_records(30))
    assert main(["data", "prepare", str(src), "--out", str(tmp_path / "p"), "--val-fraction", "0.3"]) == 0
    assert main(["train", "--out", str(tmp_path / "runs"), f"data.path={tmp_path / 'p'}", "model.preset=gpt-test",
                 "data.seq_len=32", "train.steps=1", "run.name=r"]) == 0
    assert load_config(tmp_path / "runs" / "r" / "config.toml").data.val_fraction == 0.3


def test_answers_that_hold_no_stop_token_are_said(tmp_path, hf_tok_dir, capsys):
    """A pass: a template ending turns with <|eot_id|> over a tokenizer whose EOS is <|end_of_text|> (a base
    model's tokenizer with an instruct template) trained answers the model never stops after, in silence.
    The ChatML template here ends turns with text that holds no EOS; a template that ends them with the EOS
    token is quiet."""
    import shutil

    tokenize_records([write_jsonl(tmp_path / "c.jsonl", CHAT)], str(hf_tok_dir), val_fraction=0)
    err = capsys.readouterr().err
    assert "2 conversation(s)' answers hold no token generation stops on: they end with" in err
    assert "generation stops on '<eos>'" in err
    good = tmp_path / "good"
    shutil.copytree(hf_tok_dir, good)
    cfg = json.loads((good / "tokenizer_config.json").read_text())
    cfg["chat_template"] = CHATML.replace("<|im_end|>\n", "{{ eos_token }}\n")
    (good / "tokenizer_config.json").write_text(json.dumps(cfg))
    tokenize_records([tmp_path / "c.jsonl"], str(good), val_fraction=0)
    assert "generation stops on" not in capsys.readouterr().err


def test_a_record_with_two_formats_fields_says_which_is_read(tmp_path, capsys):
    """A record with messages and prompt/completion was read as messages, the others ignored, in silence."""
    both = {"prompt": "q", "completion": " a", "messages": [{"role": "user", "content": "x"},
                                                             {"role": "assistant", "content": "y"}]}
    d = tokenize_records([write_jsonl(tmp_path / "m.jsonl", [both] * 3)], "byte", val_fraction=0)
    assert d.info["formats"] == {"messages": 3}
    assert ("3 record(s) hold the fields of messages and of prompt_completion: read as messages"
            in capsys.readouterr().err)
    tokenize_records([write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "completion": " a"}] * 3)], "byte",
                     val_fraction=0)
    assert "hold the fields of" not in capsys.readouterr().err
    # as the note says, data.format reads them as the other (it was refused: "but this record is messages")
    d = tokenize_records([tmp_path / "m.jsonl"], "byte", fmt="prompt_completion", val_fraction=0)
    assert d.info["formats"] == {"prompt_completion": 3}


@pytest.mark.parametrize("n,block", [(0, 4), (1, 4), (37, 4), (40, 8), (1000, 1 << 24)])
def test_prefix_sums_of_the_loss_flags_are_reduceats(n, block):
    from fuyou.data.examples import prefix_sums

    rng = np.random.default_rng(n)
    flags = rng.integers(0, 2, n).astype(np.uint8)
    at = [rng.integers(0, n + 3, 50), np.array([0, n, n + 1], np.int64), np.zeros(0, np.int64)]
    whole = np.concatenate([[0], np.cumsum(flags, dtype=np.int64)])
    for got, idx in zip(prefix_sums(flags, at, block=block), at):
        assert np.array_equal(got, whole[np.minimum(idx, n)])


def test_rows_of_many_tokens_hold_no_int64_copy_of_the_loss_flags():
    """Rows.build summed the loss flags with reduceat(dtype=int64), which cast the whole uint8 array first: 8 B a
    training token held beside the data (+887 MiB over the CPU budget on a 131M-token set, in a pass)."""
    import tracemalloc

    from fuyou.data.examples import Examples

    n, per = 40_000_000, 200  # 40M tokens, examples of 200
    offsets = np.arange(0, n + 1, per, dtype=np.int64)
    ex = Examples(np.zeros(n, np.uint16), np.ones(n, np.uint8), offsets)
    tracemalloc.start()
    try:
        rows = Rows.build(ex, 128, False, 0, seed=None)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(rows) == n // per and rows.truncated == n // per
    assert peak < 64 * 2**20, peak  # a block's cumulative sums and the examples' arrays, not 8 B x 40M = 305 MiB
