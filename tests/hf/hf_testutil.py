"""Tiny random Hugging Face models made on the spot (nothing downloaded), and logits on both sides."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fuyou.data.corpus import builtin_documents
from fuyou.hf.weights import FuyouWeights, write_safetensors
from fuyou.models import ModelConfig, StageModel

VOCAB = 320  # the tokenizer below has 300 tokens; the models pad to 320 like fuyou's byte models


# Llama 3.1's RoPE scaling shrunk to the tiny models: with head width 16 and base 10000 the wavelengths
# run from 6 to 20,000 tokens, so an original context of 64 keeps the shortest (< 64/4), interpolates
# the next two and divides the rest by the factor: every branch of 'llama3' is taken.
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
WINDOW = 8  # the sliding window of the "mistral-sw" model: shorter than the test sequences (tokens(): 24)


def hf_config(kind: str):
    """A tiny config of each supported kind: Llama with GQA (untied), Qwen2 (Q/K/V biases, tied),
    Mistral without a sliding window, GPT-2 (tied); and today's families (tests/hf/test_families.py):
    Llama 3.1 (llama3 RoPE scaling), Llama 3.2 (tied, llama3 scaling, and a head width of 32 apart from
    64/4, which 3.2 itself does not have), Qwen2.5 (tied; a sliding window that use_sliding_window=false
    turns off), Qwen3 (q/k norms, head width 32), Mistral with a sliding window of ``WINDOW``. RoPE
    scaling is given in v4's spelling (rope_theta, rope_scaling), which v5 reads too."""
    import transformers as tf

    llama_shape = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6,
                       bos_token_id=None, eos_token_id=299)
    if kind == "llama":
        return tf.LlamaConfig(**llama_shape, tie_word_embeddings=False, rope_theta=5000.0)
    if kind == "qwen2":
        return tf.Qwen2Config(**llama_shape, tie_word_embeddings=True)
    if kind == "mistral":
        return tf.MistralConfig(**llama_shape, sliding_window=None)
    long = {**llama_shape, "max_position_embeddings": 256}  # longer than the original context, as in 3.1
    if kind == "llama3.1":
        return tf.LlamaConfig(**long, tie_word_embeddings=False, rope_theta=10000.0, rope_scaling=LLAMA3_ROPE)
    if kind == "llama3.2":
        return tf.LlamaConfig(**long, tie_word_embeddings=True, head_dim=32, rope_theta=10000.0,
                              rope_scaling={**LLAMA3_ROPE, "factor": 32.0})
    if kind == "qwen2.5":
        return tf.Qwen2Config(**llama_shape, tie_word_embeddings=True, rope_theta=1e6, use_sliding_window=False,
                              sliding_window=WINDOW)
    if kind == "qwen3":
        return tf.Qwen3Config(**llama_shape, tie_word_embeddings=False, head_dim=32, rope_theta=1e6)
    if kind == "mistral-sw":
        return tf.MistralConfig(**llama_shape, sliding_window=WINDOW)
    if kind == "gpt2":
        return tf.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                             bos_token_id=299, eos_token_id=299)
    raise ValueError(kind)


def make_hf_model(path: Path, kind: str, tokenizer: bool = True, n_layer: int | None = None, seed: int = 0) -> Path:
    """Save a random ``kind`` model (every weight perturbed, so biases and norms are not 0/1) with
    safetensors, and a byte-level BPE tokenizer trained on a few builtin documents. ``n_layer``: other
    than ``hf_config``'s 2 layers; ``seed``: another model of the same shapes."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = hf_config(kind)
    if n_layer is not None:
        config.num_hidden_layers = n_layer  # GPT-2's n_layer is an alias of it
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(path, safe_serialization=True)
    if tokenizer:
        make_tokenizer(path)
    return path


def make_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(builtin_documents()[:20], trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>").save_pretrained(path)


def load_hf(path: Path):
    """``AutoModelForCausalLM.from_pretrained`` in fp32 (the keyword is ``dtype`` from transformers 4.56)."""
    import transformers
    from transformers import AutoModelForCausalLM

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    return AutoModelForCausalLM.from_pretrained(str(path), **{key: torch.float32}).eval()


@torch.no_grad()
def hf_logits(path: Path, tokens: torch.Tensor) -> torch.Tensor:
    return load_hf(path)(tokens).logits.float()


def fuyou_weights(file: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The model config and fp32 weights of a fuyou ``model.safetensors``."""
    w = FuyouWeights(file)
    cfg = ModelConfig(**{k: v for k, v in w.model.items() if k not in ("init_from", "preset")})
    return cfg, {k: w.tensor(k, s.shape) for k, s in StageModel(cfg).param_specs().items()}


@torch.no_grad()
def fuyou_logits(file: Path, tokens: torch.Tensor) -> torch.Tensor:
    cfg, params = fuyou_weights(file)
    return StageModel(cfg).logits(params, tokens)


@torch.no_grad()
def packed_logits(cfg: ModelConfig, params: dict[str, torch.Tensor], tokens: torch.Tensor,
                  pos: torch.Tensor) -> torch.Tensor:
    """fuyou's logits of rows of packed documents: ``pos`` (B, T) restarts at 0 where a document starts."""
    x = tokens
    for stage in StageModel(cfg):
        x = stage.forward(stage.bind(params), x, pos=pos)
    return x


def write_fuyou_run(run: Path, cfg: ModelConfig, params: dict[str, torch.Tensor]) -> Path:
    """A run directory holding only ``model.safetensors`` (a model trained from scratch, as export sees it)."""
    specs = StageModel(cfg).param_specs()
    run.mkdir()
    write_safetensors(run / "model.safetensors", {k: s.shape for k, s in specs.items()}, (params[k] for k in specs),
                      {"fuyou_model": json.dumps(cfg.model_dump())})
    return run


def finetune(tmp_path: Path, init: list[str], offload: bool) -> Path:
    """``fuyou train`` for 3 fp32 steps on a small text corpus (``init``: --init-from or --config), in
    memory or with the state on an SSD directory; returns the run directory."""
    from fuyou.cli import main

    ssd = tmp_path / "ssd"
    ssd.mkdir(exist_ok=True)
    args = ["train", *init, "--out", str(tmp_path / "runs"), "--steps", "3", "run.name=r", "train.precision=fp32",
            "data.source=text", f"data.path={write_corpus(tmp_path / 'corpus.txt')}", "data.seq_len=16",
            "train.micro_batch_size=2", "train.eval_batches=1", "train.warmup_steps=1", "train.eval_every=0",
            "train.grad_clip=none"]
    if offload:
        args += ["--offload", "ssd", "--ssd", str(ssd), "offload.cpu_mem=256MiB"]
    assert main(args) == 0
    return tmp_path / "runs" / "r"


def write_corpus(path: Path) -> Path:
    path.write_text("\n\n".join(builtin_documents()[20:40]))
    return path


def tokens(n: int = 2, t: int = 24) -> torch.Tensor:
    return torch.randint(0, 300, (n, t), generator=torch.Generator().manual_seed(1))


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())
