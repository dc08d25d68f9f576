"""Make a tiny, randomly initialised Hugging Face checkpoint of a current model family, with a
tokenizer that has the family's chat template, and a chat JSONL to fine-tune it on: the README's
worked example without a download.

    python tools/make_tiny_checkpoint.py --family llama3.1 --out tiny-llama --chat-data chat.jsonl

The tokenizer is a byte-level BPE of 2,000 tokens trained on the embedded corpus (Python's pydoc
topics) with the family's special tokens; the model has the family's architecture (Llama 3.1's
``llama3`` RoPE scaling, Qwen3's q/k norms, ...) at a tiny width. The chat data turns pydoc topics
into conversations: "What does the Python documentation say about X?" answered by the topic's first
sentences. Needs the ``hf`` extra (transformers, tokenizers).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% elif m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}{% else %}{{ m['content'] }}\n\n"
    "{% endif %}{% endfor %}"
)

# family -> (special tokens, bos, eos, pad, chat template)
TOKENS = {
    "llama3.1": (["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
                 "<|begin_of_text|>", "<|eot_id|>", "<|end_of_text|>", LLAMA3_TEMPLATE),
    "qwen2.5": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|im_end|>", "<|endoftext|>", CHATML_TEMPLATE),
    "qwen3": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|im_end|>", "<|endoftext|>", CHATML_TEMPLATE),
    "mistral": (["<unk>", "<s>", "</s>"], "<s>", "</s>", "</s>", MISTRAL_TEMPLATE),
}


def make_tokenizer(family: str, out: Path, vocab: int = 2000):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from fuyou.data.corpus import builtin_documents

    specials, bos, eos, pad, template = TOKENS[family]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(builtin_documents(), trainer)
    if bos is not None:  # the tokenizer adds BOS to a sequence, as Llama's and Mistral's do
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad)
    fast.chat_template = template
    fast.save_pretrained(out)
    return fast


def make_model(family: str, out: Path, tok) -> None:
    import transformers as tf

    n = len(tok)
    vocab = -(-n // 64) * 64
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    shape = dict(vocab_size=vocab, hidden_size=128, intermediate_size=344, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-5, **ids)
    if family == "llama3.1":
        cfg = tf.LlamaConfig(**shape, rope_theta=500000.0, tie_word_embeddings=False,
                             rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 128})
    elif family == "qwen2.5":
        cfg = tf.Qwen2Config(**shape, rope_theta=1000000.0, tie_word_embeddings=True, use_sliding_window=False)
    elif family == "qwen3":
        cfg = tf.Qwen3Config(**{**shape, "head_dim": 48}, rope_theta=1000000.0, tie_word_embeddings=True,
                             use_sliding_window=False, attention_bias=False)
    else:
        cfg = tf.MistralConfig(**shape, rope_theta=1000000.0, sliding_window=None, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(out, safe_serialization=True)


def chat_records(n: int | None = None) -> list[dict]:
    from fuyou.data.corpus import builtin_documents
    from pydoc_data.topics import topics

    out = []
    for name, text in zip(sorted(topics), builtin_documents()):
        body = " ".join(text.split())
        sentences = re.split(r"(?<=[.!?])\s+", body)
        answer = " ".join(sentences[:3])[:600]
        if len(answer) < 40:
            continue
        out.append({"messages": [
            {"role": "system", "content": "You answer questions about Python from its documentation."},
            {"role": "user", "content": f"What does the Python documentation say about '{name}'?"},
            {"role": "assistant", "content": answer},
        ]})
    return out[:n] if n else out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", choices=sorted(TOKENS), default="llama3.1")
    p.add_argument("--out", required=True, help="the checkpoint directory to write")
    p.add_argument("--chat-data", help="also write a chat JSONL (pydoc topics as conversations) here")
    args = p.parse_args(argv)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        print(f"{out} is a file; --out is the checkpoint directory to write", file=sys.stderr)
        return 2
    if out.exists() and any(out.iterdir()):
        print(f"{out} exists and is not empty; choose a new --out", file=sys.stderr)
        return 2
    chat = Path(args.chat_data) if args.chat_data else None
    if chat is not None and (chat.is_dir() or not chat.parent.is_dir()):  # (checked first: the checkpoint was
        print(f"--chat-data {chat}: give a file in an existing directory", file=sys.stderr)  # written, then a crash)
        return 2
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"cannot make --out {out}: {e.strerror}", file=sys.stderr)
        return 2
    tok = make_tokenizer(args.family, out)
    make_model(args.family, out, tok)
    print(f"wrote a tiny {args.family} checkpoint ({len(tok)}-token tokenizer with a chat template) to {out}")
    if args.chat_data:
        recs = chat_records()
        chat.write_text("".join(json.dumps(r) + "\n" for r in recs))
        print(f"wrote {len(recs)} conversations to {args.chat_data}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
