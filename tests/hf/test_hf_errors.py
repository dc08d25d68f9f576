"""What fuyou refuses to import, and that it says what to do instead. Only config.json and small
files are written here (no transformers needed), so these run without the hf extra."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fuyou.cli import main
from fuyou.config import load_config
from fuyou.errors import ConfigError, DataError
from fuyou.hf import export_run, open_checkpoint
from fuyou.train.run import import_checkpoint
from fuyou.hf.config_map import to_fuyou

LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 160,
         "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 32,
         "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "rope_scaling": None}


def hf_dir(path, config: dict, weights: dict | None = None, files=("model.safetensors",)):
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    for name in files:
        if name.endswith(".safetensors"):
            save_file(weights or {"model.embed_tokens.weight": torch.zeros(32, 64)}, str(path / name))
        else:
            (path / name).write_bytes(b"not a real checkpoint")
    return path


def test_unsupported_architecture_lists_the_supported_ones(tmp_path, capsys):
    src = hf_dir(tmp_path / "bert", {"architectures": ["BertForMaskedLM"], "model_type": "bert"})
    with pytest.raises(ConfigError, match="BertForMaskedLM is not supported") as e:
        import_checkpoint(src, tmp_path / "out")
    for arch in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "GPT2LMHeadModel"):
        assert arch in str(e.value)
    assert main(["import", str(src), "--out", str(tmp_path / "out")]) == 2
    assert "not supported" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


QWEN2 = {**LLAMA, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "num_hidden_layers": 2}
QWEN3 = {**QWEN2, "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "head_dim": 32}
LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16}


@pytest.mark.parametrize("config,match", [
    ({**LLAMA, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}}, "RoPE scaling 'yarn'"),
    ({**LLAMA, "rope_scaling": {"type": "dynamic", "factor": 2.0}}, "RoPE scaling 'dynamic'"),
    ({**LLAMA, "rope_scaling": {"rope_type": "longrope", "short_factor": [1.0], "long_factor": [2.0]}},
     "RoPE scaling 'longrope'"),
    ({**LLAMA, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "'llama3' lacks low_freq_factor"),
    ({**LLAMA, "rope_scaling": {**LLAMA31_ROPE, "high_freq_factor": 0.5}}, "high_freq_factor must exceed"),
    ({**LLAMA, "partial_rotary_factor": 0.5}, "rotates part of each head"),
    ({**LLAMA, "attention_bias": True}, "Q, K, V and O projections"),
    ({**QWEN3, "attention_bias": True}, "attention_bias=true in Qwen3ForCausalLM biases the Q, K, V and O"),
    ({**LLAMA, "hidden_act": "gelu"}, "SwiGLU"),
    ({**LLAMA, "hidden_size": 66, "head_dim": None}, "not a multiple of num_attention_heads"),
    ({**LLAMA, "quantization_config": {"quant_method": "gptq"}}, "quantized"),
    ({**LLAMA, "hidden_size": None}, "lacks hidden_size"),
    # Sliding-window attention on some layers only: Qwen2's max_window_layers, explicit layer_types.
    ({**QWEN2, "use_sliding_window": True, "sliding_window": 16, "max_window_layers": 1},
     "1 of 2 layers use sliding-window attention"),
    ({**QWEN3, "use_sliding_window": True, "sliding_window": 16,
      "layer_types": ["sliding_attention", "full_attention"]}, "1 of 2 layers use sliding-window"),
    ({**LLAMA, "architectures": ["MistralForCausalLM"], "model_type": "mistral", "sliding_window": 16,
      "layer_types": ["full_attention", "sliding_attention"]}, "one attention to every layer"),
    ({**QWEN2, "layer_types": ["chunked_attention"] * 2}, "full and sliding-window attention only"),
])
def test_configs_fuyou_does_not_compute_are_refused(config, match):
    with pytest.raises(ConfigError, match=match):
        to_fuyou(config)


@pytest.mark.parametrize("arch,model_type,why", [
    ("Gemma2ForCausalLM", "gemma2", r"\(1 \+ w\).*sqrt\(hidden_size\).*GeGLU.*soft-capped"),
    ("Gemma3ForCausalLM", "gemma3_text", "q/k norms and a second RoPE base"),
    ("GemmaForCausalLM", "gemma", "GeGLU"),
    ("Phi3ForCausalLM", "phi3", "qkv_proj.*gate_up_proj.*longrope"),
])
def test_gemma_and_phi3_are_refused_with_the_reason(arch, model_type, why):
    config = {**LLAMA, "architectures": [arch], "model_type": model_type}
    for c in (config, {k: v for k, v in config.items() if k != "architectures"}):  # also found by model_type
        with pytest.raises(ConfigError, match=f"{arch} is not supported: .*{why}.*fuyou imports .*Qwen3ForCausalLM"):
            to_fuyou(c)


def test_accepted_spellings():
    v5 = {**LLAMA, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}
    del v5["rope_theta"], v5["rope_scaling"]
    assert to_fuyou(v5)["rope_theta"] == 5e5
    # Llama 3.1's RoPE scaling, v4's spelling (rope_type or the older type) and v5's, and linear scaling.
    scaled = {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 16}
    assert to_fuyou({**LLAMA, "rope_scaling": LLAMA31_ROPE})["rope_scaling"] == scaled
    old = {k: v for k, v in LLAMA31_ROPE.items() if k != "rope_type"}
    assert to_fuyou({**LLAMA, "rope_scaling": {**old, "type": "llama3"}})["rope_scaling"] == scaled
    assert to_fuyou({**v5, "rope_parameters": {**LLAMA31_ROPE, "rope_theta": 5e5}})["rope_scaling"] == scaled
    assert to_fuyou({**LLAMA, "rope_scaling": {"type": "linear", "factor": 2.0}})["rope_scaling"]["factor"] == 2.0
    # A head width apart from hidden/heads (Qwen3, Mistral Nemo); equal to it: no d_head.
    assert to_fuyou({**LLAMA, "head_dim": 32})["d_head"] == 32
    assert to_fuyou({**LLAMA, "head_dim": 16})["d_head"] is None
    assert to_fuyou(QWEN3)["qk_norm"] is True and to_fuyou(QWEN3)["attn_bias"] is False
    # Sliding windows: Mistral's applies to every layer when set (Mistral v0.2 and later: null), also one as long
    # as the context, which a sequence past the model's positions reaches (it was dropped: a pass). Qwen's needs
    # use_sliding_window on every layer (max_window_layers 0); Llama has none (transformers ignores the key).
    mistral = {**LLAMA, "architectures": ["MistralForCausalLM"], "model_type": "mistral"}
    assert to_fuyou({**mistral, "sliding_window": 16})["sliding_window"] == 16
    assert to_fuyou({**mistral, "sliding_window": 64})["sliding_window"] == 64
    assert to_fuyou({**mistral, "sliding_window": None})["sliding_window"] is None
    assert to_fuyou({**QWEN2, "use_sliding_window": False, "sliding_window": 16})["sliding_window"] is None
    assert to_fuyou({**QWEN2, "use_sliding_window": False, "sliding_window": 16,
                     "max_window_layers": 1})["sliding_window"] is None
    assert to_fuyou({**QWEN3, "use_sliding_window": True, "sliding_window": 16,
                     "max_window_layers": 0})["sliding_window"] == 16
    assert to_fuyou({**LLAMA, "sliding_window": 16})["sliding_window"] is None
    assert to_fuyou({"model_type": "gpt2", "n_embd": 64, "n_layer": 1, "n_head": 4})["tie_embeddings"] is True


def test_a_model_no_architecture_computes_is_not_exported(tmp_path, capsys):
    """A pass: such a model trained and planned without a word, and its export was refused after its weights were
    written, leaving a half-made directory. Train and plan say so; export refuses before writing anything."""
    from fuyou.hf.config_map import to_hf
    from fuyou.models import ModelConfig, StageModel, preset

    from hf_testutil import write_fuyou_run

    cfg = ModelConfig(**{**preset("llama-test"), "qk_norm": True, "attn_bias": True})
    with pytest.raises(ConfigError, match="q/k norms with Q/K/V biases only"):
        to_hf(cfg)
    run = write_fuyou_run(tmp_path / "run", cfg, StageModel(cfg).init_params(seed=1))
    assert main(["export", str(run), "--out", str(tmp_path / "out")]) == 2
    assert "q/k norms with Q/K/V biases only" in capsys.readouterr().err and not (tmp_path / "out").exists()
    shape = ["model.qk_norm=true", "model.attn_bias=true"]
    assert main(["plan", "--model", "llama-test", "--gpu", "rtx4090", "--ssd", "990-pro", "--seq", "64", *shape]) == 0
    assert "this model trains, but `fuyou export` cannot write it for transformers" in capsys.readouterr().err
    assert main(["train", "--model", "llama-test", "--out", str(tmp_path / "runs"), "train.steps=1",
                 "data.seq_len=16", "train.micro_batch_size=2", "train.eval_batches=1", *shape]) == 0
    assert "this model trains, but `fuyou export` cannot write it for transformers" in capsys.readouterr().err


def test_bin_only_checkpoints_are_refused_with_a_conversion_hint(tmp_path):
    src = hf_dir(tmp_path / "m", LLAMA, files=("pytorch_model.bin",))
    with pytest.raises(ConfigError, match=r"no \*\.safetensors weights.*pytorch_model\.bin.*safe_serialization"):
        open_checkpoint(src)


def test_missing_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(flags={"model.init_from": str(tmp_path / "nowhere")})
    weights_only = tmp_path / "w"
    weights_only.mkdir()
    save_file({"model.embed_tokens.weight": torch.zeros(2, 2)}, str(weights_only / "model.safetensors"))
    with pytest.raises(ConfigError, match="config.json"):
        open_checkpoint(weights_only)
    with pytest.raises(ConfigError, match="no config.json"):
        import_checkpoint(weights_only, tmp_path / "out")
    # An index naming a shard that is not there.
    sharded = hf_dir(tmp_path / "s", LLAMA, files=())
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-1-of-2.safetensors"}}))
    with pytest.raises(ConfigError, match="model-1-of-2.safetensors, which is missing"):
        open_checkpoint(sharded)
    with pytest.raises(ConfigError, match="no model.safetensors"):
        export_run(tmp_path / "w2", tmp_path / "out2")


def test_incomplete_weights_name_the_missing_tensor(tmp_path):
    src = hf_dir(tmp_path / "m", LLAMA)  # only the embedding
    with pytest.raises(DataError, match="model.layers.0.input_layernorm.weight"):
        import_checkpoint(src, tmp_path / "out")


def test_init_from_shape_wins_over_the_preset(tmp_path, capsys):
    src = hf_dir(tmp_path / "m", LLAMA)
    cfg = load_config(overrides=["model.preset=gpt-test", "model.n_layer=3", "data.source=synthetic"],
                      flags={"model.init_from": str(src)})
    assert (cfg.model.family, cfg.model.n_layer, cfg.model.vocab_size, cfg.model.preset) == ("llama", 1, 32, None)
    err = capsys.readouterr().err
    assert "preset 'gpt-test' ignored" in err and "n_layer 3 -> 1" in err


def test_a_checkpoint_without_a_tokenizer_needs_one_named_for_text_data(tmp_path):
    """A pretrained model's vocabulary is not bytes: text for a checkpoint without tokenizer files is
    refused unless a tokenizer (or bytes, knowingly) is named; synthetic data needs none."""
    src = hf_dir(tmp_path / "m", LLAMA)
    with pytest.raises(ConfigError, match="without tokenizer files .* data.tokenizer=DIR"):
        load_config(flags={"model.init_from": str(src)})
    assert load_config(overrides=["data.tokenizer=byte"], flags={"model.init_from": str(src)}).data.tokenizer == "byte"
    assert load_config(overrides=["data.source=synthetic"], flags={"model.init_from": str(src)}).data.source == "synthetic"


def test_an_index_pointing_outside_the_model_directory_is_refused(tmp_path):
    outside = tmp_path / "elsewhere.safetensors"
    save_file({"model.embed_tokens.weight": torch.zeros(32, 64)}, str(outside))
    src = hf_dir(tmp_path / "m", LLAMA, files=())
    (src / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.embed_tokens.weight": "../elsewhere.safetensors"}}))
    with pytest.raises(ConfigError, match="outside the model directory"):
        open_checkpoint(src)


def test_files_symlinked_out_of_the_model_directory_are_not_copied(tmp_path, capsys):
    secret = tmp_path / "secret.txt"
    secret.write_text("private")
    src = hf_dir(tmp_path / "m", LLAMA)
    (src / "tokenizer_config.json").symlink_to(secret)
    from fuyou.hf.source import copy_small_files

    copied = copy_small_files(src, tmp_path / "dst")
    assert "tokenizer_config.json" not in copied and not (tmp_path / "dst" / "tokenizer_config.json").exists()
    assert "symlink out of the model directory" in capsys.readouterr().err


def _as_hf_cache(model: Path, root: Path) -> Path:
    """``model``'s files laid out as the Hugging Face cache keeps them: ``models--me--tiny/blobs/HASH``
    and ``snapshots/REV/NAME -> ../../blobs/HASH``. Returns the snapshot directory."""
    import hashlib

    repo = root / "models--me--tiny"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    for f in model.iterdir():
        h = hashlib.sha256(f.read_bytes()).hexdigest()
        (repo / "blobs" / h).write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(Path("../../blobs") / h)
    return snap


@pytest.mark.parametrize("sharded", [False, True])
def test_a_snapshot_of_the_hf_cache_imports_with_its_tokenizer(tmp_path, capsys, sharded):
    """The cache's files are symlinks into its blobs: followed (a new-user pass found a sharded snapshot
    refused as "outside the model directory", and a single-file one imported without config or tokenizer,
    then trained on byte ids)."""
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM

    from hf_testutil import fuyou_logits, hf_logits, make_hf_model, tokens

    src = make_hf_model(tmp_path / "m", "llama")
    if sharded:
        model = AutoModelForCausalLM.from_pretrained(src)
        shard = tmp_path / "sharded"
        model.save_pretrained(shard, max_shard_size="40KB")
        for f in src.iterdir():
            if not f.name.startswith("model") and not (shard / f.name).exists():
                (shard / f.name).write_bytes(f.read_bytes())
        src = shard
        assert (src / "model.safetensors.index.json").exists()
    snap = _as_hf_cache(src, tmp_path / "cache")
    assert main(["import", str(snap), "--out", str(tmp_path / "imp")]) == 0
    err = capsys.readouterr().err
    assert "skipping" not in err, err
    assert (tmp_path / "imp" / "hf" / "config.json").is_file() and (tmp_path / "imp" / "hf" / "tokenizer.json").is_file()
    assert 'tokenizer = "byte"' not in (tmp_path / "imp" / "config.toml").read_text()
    x = tokens()
    assert torch.allclose(fuyou_logits(tmp_path / "imp" / "model.safetensors", x), hf_logits(snap, x), atol=1e-5)


def test_an_imported_config_takes_a_data_path(tmp_path):
    """`fuyou import` prints `fuyou train --config RUN_DIR/config.toml`; a user adds data.path=... and the
    run reads it (the file used to say data.source="builtin", which kept the embedded corpus); a
    data.path that the source would not read is refused."""
    pytest.importorskip("transformers")
    from hf_testutil import make_hf_model, write_corpus

    src = make_hf_model(tmp_path / "m", "llama")
    out = import_checkpoint(src, tmp_path / "imp")
    corpus = write_corpus(tmp_path / "corpus.txt")
    cfg = load_config(out / "config.toml", overrides=[f"data.path={corpus}"])
    assert cfg.data.source == "text" and cfg.data.path == [str(corpus)]
    assert load_config(out / "config.toml").data.source == "builtin"
    with pytest.raises(ConfigError, match="data.source='builtin' does not read it"):
        load_config(Path(__file__).parents[2] / "configs" / "default.toml", overrides=[f"data.path={corpus}"])


def _edit_config(path: Path, **changes) -> None:
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def test_weights_config_json_does_not_describe_are_refused_not_dropped(tmp_path):
    """A new-user pass: config.json saying tied over a separate lm_head (transformers keeps the head;
    fuyou tied it, logits 7.8 apart), or one layer fewer than the weights hold, imported in silence."""
    pytest.importorskip("transformers")
    from hf_testutil import make_hf_model

    src = make_hf_model(tmp_path / "m", "llama")  # untied
    _edit_config(src, tie_word_embeddings=True)
    with pytest.raises(ConfigError, match="tie_word_embeddings=true, but the checkpoint's lm_head.weight differs"):
        import_checkpoint(src, tmp_path / "a")
    with pytest.raises(ConfigError, match="tie_word_embeddings=true"):  # train --init-from reads it too
        from fuyou.train.loop import build_trainer

        build_trainer(load_config(flags={"model.init_from": str(src)}), "x")
    _edit_config(src, tie_word_embeddings=False, num_hidden_layers=1)
    with pytest.raises(ConfigError, match=r"does not use: model\.layers\.1\."):
        import_checkpoint(src, tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # refused before writing


def test_a_tied_checkpoint_may_carry_its_head_when_it_is_the_embedding(tmp_path):
    pytest.importorskip("transformers")
    from safetensors.torch import load_file

    from hf_testutil import make_hf_model

    src = make_hf_model(tmp_path / "m", "llama")
    _edit_config(src, tie_word_embeddings=True)
    w = load_file(str(src / "model.safetensors"))
    w["lm_head.weight"] = w["model.embed_tokens.weight"].clone()
    save_file(w, str(src / "model.safetensors"))
    import_checkpoint(src, tmp_path / "ok")
    got = load_file(str(tmp_path / "ok" / "model.safetensors"))  # one tensor, the embedding, serves as the head
    assert torch.equal(got["embed.wte"], w["model.embed_tokens.weight"]) and not any("lm_head" in k for k in got)
    assert load_config(tmp_path / "ok" / "config.toml").model.tie_embeddings


def test_without_an_index_model_safetensors_is_the_model(tmp_path):
    """An EMA copy (the same keys) beside model.safetensors is not read in its place; without
    model.safetensors, two files holding one tensor are refused."""
    pytest.importorskip("transformers")
    from safetensors.torch import load_file

    from hf_testutil import fuyou_logits, hf_logits, make_hf_model, tokens

    src = make_hf_model(tmp_path / "m", "llama")
    w = load_file(str(src / "model.safetensors"))
    save_file({k: v * 0.5 for k, v in w.items()}, str(src / "model_ema.safetensors"))
    out = import_checkpoint(src, tmp_path / "imp")
    x = tokens()
    assert torch.allclose(fuyou_logits(out / "model.safetensors", x), hf_logits(src, x), atol=1e-5)
    (src / "model.safetensors").rename(src / "model-a.safetensors")
    with pytest.raises(ConfigError, match="both hold"):
        open_checkpoint(src)


def test_a_config_fuyou_cannot_build_is_an_error_not_a_traceback(tmp_path, capsys):
    pytest.importorskip("transformers")
    from hf_testutil import make_hf_model

    src = make_hf_model(tmp_path / "m", "llama")
    _edit_config(src, num_key_value_heads=3)
    assert main(["import", str(src), "--out", str(tmp_path / "imp")]) != 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and "cannot build" in err, err


def test_import_refuses_early_and_leaves_nothing_behind(tmp_path):
    """No tokenizer: said before the weights are converted (it was said after, with advice `fuyou import`
    has no option for); a missing tensor: the half-written directory is removed, so a retry into it works."""
    pytest.importorskip("transformers")
    from safetensors.torch import load_file

    from hf_testutil import make_hf_model

    src = make_hf_model(tmp_path / "m", "llama", tokenizer=False)
    with pytest.raises(ConfigError, match="no tokenizer files .* copy them"):
        import_checkpoint(src, tmp_path / "a")
    assert not (tmp_path / "a").exists()
    src = make_hf_model(tmp_path / "m2", "llama")
    good = load_file(str(src / "model.safetensors"))
    save_file({k: v for k, v in good.items() if k != "model.layers.1.mlp.up_proj.weight"}, str(src / "model.safetensors"))
    with pytest.raises(DataError, match="up_proj"):
        import_checkpoint(src, tmp_path / "b")
    assert not (tmp_path / "b").exists()
    save_file(good, str(src / "model.safetensors"))
    import_checkpoint(src, tmp_path / "b")
    with pytest.raises(ConfigError, match="does not exist"):
        import_checkpoint(tmp_path / "nope", tmp_path / "c")


def test_a_run_keeps_its_sources_config_and_tokenizer_for_export(tmp_path):
    """Train from a Hugging Face directory, delete it, export: the export still has the tokenizer and the
    source's token ids (they were lost, with no word, when the source was gone)."""
    pytest.importorskip("transformers")
    import shutil

    from transformers import AutoTokenizer

    from hf_testutil import finetune, make_hf_model

    src = make_hf_model(tmp_path / "m", "llama")
    want = json.loads((src / "config.json").read_text())
    run = finetune(tmp_path, ["--init-from", str(src)], offload=False)
    shutil.rmtree(src)
    export_run(run, tmp_path / "ex")
    got = json.loads((tmp_path / "ex" / "config.json").read_text())
    assert (tmp_path / "ex" / "tokenizer.json").is_file()
    AutoTokenizer.from_pretrained(tmp_path / "ex")
    for k in ("bos_token_id", "eos_token_id"):
        assert got.get(k) == want.get(k), k


@pytest.mark.parametrize("bad", [{"hidden_size": "abc"}, {"rope_parameters": "linear"}, {"rope_scaling": [1, 2]},
                                 {"architectures": [1]}])
def test_a_malformed_field_is_a_config_error(bad):
    with pytest.raises(ConfigError, match="architectures is|cannot read"):
        to_fuyou({**LLAMA, **bad})
    with pytest.raises(ConfigError) as e:  # a refusal of its own keeps its words
        to_fuyou({**LLAMA, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}})
    assert "cannot read" not in str(e.value)


def test_an_inactive_sliding_window_survives_the_round_trip():
    """Mistral's window at least its positions applies only past them: the export kept null in its place, which
    changed the model there (found by a new-user pass); fuyou, which trains past them, keeps it too (it mapped
    it to none, and trained with full attention where transformers' model has the window: a later pass)."""
    from fuyou.hf.config_map import to_hf
    from fuyou.models import ModelConfig

    hf = {**LLAMA, "architectures": ["MistralForCausalLM"], "model_type": "mistral", "sliding_window": 4096,
          "max_position_embeddings": 256}
    model = ModelConfig(**to_fuyou(hf))
    assert model.sliding_window == 4096
    assert to_hf(model, template=hf)["sliding_window"] == 4096
    qwen = {**QWEN2, "use_sliding_window": False, "sliding_window": 131072}
    out = to_hf(ModelConfig(**to_fuyou(qwen)), template=qwen)
    assert out["use_sliding_window"] is False and out["sliding_window"] == 131072


def test_an_hf_directory_given_to_export_and_an_adapter_given_as_a_model_are_named(tmp_path):
    pytest.importorskip("transformers")
    from hf_testutil import make_hf_model

    src = make_hf_model(tmp_path / "m", "llama")
    with pytest.raises(ConfigError, match="is a Hugging Face model directory, not a fuyou run"):
        export_run(src, tmp_path / "x")
    ad = tmp_path / "adapter"
    ad.mkdir()
    (ad / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (ad / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match="is a PEFT adapter .* lora.init_from="):
        open_checkpoint(ad)


def _sharded(tmp_path: Path) -> Path:
    from transformers import AutoModelForCausalLM

    from hf_testutil import make_hf_model

    src = make_hf_model(tmp_path / "m", "llama")
    shard = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(src).save_pretrained(shard, max_shard_size="40KB")
    for f in src.iterdir():
        if not f.name.startswith("model") and not (shard / f.name).exists():
            (shard / f.name).write_bytes(f.read_bytes())
    return shard


def test_paths_and_symlinks_a_user_has_are_followed_and_crafted_ones_are_not(tmp_path, monkeypatch, capsys):
    """A review of the cache-snapshot change: a sharded model named through '..' was refused; a directory
    that is a symlink to a snapshot lost its tokenizer; a snapshot whose blobs directory is a symlink could
    copy any file into the run; an index could reach out through a symlinked subdirectory."""
    pytest.importorskip("transformers")
    shard = _sharded(tmp_path)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    import_checkpoint(Path("../sharded"), tmp_path / "a")  # through ..
    snap = _as_hf_cache(shard, tmp_path / "cache")
    (tmp_path / "link").symlink_to(snap)
    import_checkpoint(tmp_path / "link", tmp_path / "b")  # a symlink to a snapshot
    assert (tmp_path / "b" / "hf" / "tokenizer.json").is_file() and "skipping" not in capsys.readouterr().err
    # crafted: blobs is a symlink to a directory of secrets
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "id_rsa").write_text("PRIVATE KEY")
    repo = tmp_path / "evil" / "models--x--y"
    evil = repo / "snapshots" / "rev"
    evil.mkdir(parents=True)
    (repo / "blobs").symlink_to(secrets)
    (evil / "notes.txt").symlink_to(Path("../../blobs/id_rsa"))
    from fuyou.hf.source import copy_small_files

    copied = copy_small_files(evil, tmp_path / "dst")
    assert "notes.txt" not in copied and not (tmp_path / "dst" / "notes.txt").exists()
    # an index through a symlinked subdirectory
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "w.safetensors").write_bytes((shard / next(p.name for p in shard.glob("model-*.safetensors"))).read_bytes())
    sub = tmp_path / "subm"
    sub.mkdir()
    (sub / "config.json").write_bytes((shard / "config.json").read_bytes())
    (sub / "s").symlink_to(outside)
    (sub / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"model.embed_tokens.weight": "s/w.safetensors"}}))
    with pytest.raises(ConfigError, match="outside the model directory"):
        open_checkpoint(sub)


def test_known_buffers_and_a_string_architecture_are_accepted_and_a_wrong_shape_refused_before_writing(tmp_path):
    pytest.importorskip("transformers")
    from safetensors.torch import load_file

    from hf_testutil import make_hf_model

    src = make_hf_model(tmp_path / "m", "llama")
    w = load_file(str(src / "model.safetensors"))
    w["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    save_file(w, str(src / "model.safetensors"))
    _edit_config(src, architectures="LlamaForCausalLM")
    import_checkpoint(src, tmp_path / "ok")
    w["model.layers.1.mlp.up_proj.weight"] = w["model.layers.1.mlp.up_proj.weight"][:, :-1].contiguous()
    save_file(w, str(src / "model.safetensors"))
    with pytest.raises(DataError, match="up_proj.weight' has shape"):
        import_checkpoint(src, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_stored_tensors_are_compared_a_block_of_rows_at_a_time(tmp_path):
    """A tied head checked against the embedding: compared in row blocks (bounded memory), every row read."""
    import torch
    from safetensors.torch import save_file

    from fuyou.hf.weights import _equal

    e = torch.randn(1000, 48).to(torch.bfloat16)
    h = e.clone()
    h[-1, -1] += 1
    save_file({"e": e, "same": e.clone(), "h": h, "short": e[:999].clone()}, str(tmp_path / "a.safetensors"))
    save_file({"e16": e.to(torch.float16)}, str(tmp_path / "b.safetensors"))
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    assert _equal(a, "e", a, "same", block=1000)  # 5 rows a block
    assert not _equal(a, "e", a, "h", block=1000)  # the last row of the last block differs
    assert not _equal(a, "e", a, "short") and not _equal(a, "e", b, "e16")


def test_an_fp16_export_of_weights_beyond_its_range_is_refused(tmp_path, capsys):
    """`fuyou export --dtype fp16` of a model with a weight of 1e6 wrote inf, in silence."""
    from fuyou.models import ModelConfig, StageModel, preset
    from fuyou.hf.weights import write_safetensors

    cfg = ModelConfig(**preset("gpt-test"))
    specs = StageModel(cfg).param_specs()
    params = {k: torch.zeros(s.shape) for k, s in specs.items()}
    last = list(specs)[-1]
    params[last].view(-1)[0] = 1e6
    run = tmp_path / "run"
    run.mkdir()
    write_safetensors(run / "model.safetensors", {k: s.shape for k, s in specs.items()}, (params[k] for k in specs),
                      {"fuyou_model": json.dumps(cfg.model_dump())})
    with pytest.raises(ConfigError, match=f"{last} holds values up to 1e\\+06, beyond fp16's largest"):
        export_run(run, tmp_path / "ex", "fp16", shard_size=4096)  # several shards: the first ones written
    assert not (tmp_path / "ex").exists() or not list((tmp_path / "ex").iterdir())
    capsys.readouterr()  # the command removes the directory it made (it said "nothing was written" beside it)
    assert main(["export", str(run), "--out", str(tmp_path / "ex2"), "--dtype", "fp16"]) == 2
    assert "nothing was written" in capsys.readouterr().err and not (tmp_path / "ex2").exists()
    export_run(run, tmp_path / "ex", "bf16")


def test_a_stopped_export_or_save_leaves_nothing_that_passes_for_whole(tmp_path):
    """A killed export left a half-written model.safetensors that a second export called only "not empty";
    a killed save left model.safetensors.tmp.<pid> beside the run for good (a faults pass). Exports write
    each file under a temporary name and config.json last; a save removes its dead writers' leftovers."""
    from fuyou.hf.export import refuse_nonempty
    from fuyou.hf.weights import write_safetensors

    stopped = tmp_path / "stopped"
    stopped.mkdir()
    (stopped / "tokenizer.json").write_text("{}")
    (stopped / ".model.safetensors.tmp").write_bytes(b"half")
    with pytest.raises(ConfigError, match="an export stopped before it finished"):
        refuse_nonempty(stopped)
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"exists and is not empty; choose a new --out directory"):
        refuse_nonempty(tmp_path / "done")
    refuse_nonempty(tmp_path / "new")  # (absent: fine)
    run = tmp_path / "run"
    run.mkdir()
    import socket

    host = socket.gethostname().replace(".", "-")
    (run / f"model.safetensors.tmp.{host}.4194303").write_bytes(b"x")  # above the largest Linux PID: no writer
    write_safetensors(run / "model.safetensors", {"a": (2,)}, [torch.ones(2)])
    assert sorted(p.name for p in run.iterdir()) == ["model.safetensors"]


def test_damaged_weights_are_not_exported_and_a_stopped_in_memory_run_names_its_snapshot(tmp_path, capsys):
    """A model.safetensors with a few bytes overwritten exported NaN weights without a word; an in-memory
    run stopped by a signal (its weights kept as a snapshot, which its stop message names) was "nothing of
    it was kept" to `fuyou export` (a new-user pass)."""
    pytest.importorskip("transformers")
    from safetensors.torch import load_file

    args = ["train", "--out", str(tmp_path / "runs"), "model.preset=gpt-test", "data.seq_len=32", "train.steps=2",
            "train.micro_batch_size=2", "train.eval_every=0"]
    assert main([*args, "run.name=a"]) == 0
    run = tmp_path / "runs" / "a"
    from safetensors import safe_open

    with safe_open(str(run / "model.safetensors"), framework="pt") as f:
        meta = f.metadata()
    w = load_file(str(run / "model.safetensors"))
    key = sorted(w)[0]
    w[key][0] = float("nan")
    save_file(w, str(run / "model.safetensors"), metadata=meta)
    capsys.readouterr()
    assert main(["export", str(run), "--out", str(tmp_path / "out")]) == 2
    assert f"{key} holds non-finite values" in capsys.readouterr().err
    # an in-memory run stopped after its snapshot: the snapshot is named
    assert main([*args, "run.name=b", "run.save_weights=false", "train.save_every=1"]) == 0
    capsys.readouterr()
    assert main(["export", str(tmp_path / "runs" / "b"), "--out", str(tmp_path / "out2")]) == 2
    assert f"fuyou export {tmp_path / 'runs' / 'b' / 'snapshots' / 'step-000001'}" in capsys.readouterr().err


def _two_shards(tmp_path, name: str) -> Path:
    """A tiny GPT-2 checkpoint cut into two shards with its index (dropout 0.1 each, transformers' default)."""
    pytest.importorskip("transformers")
    from safetensors.torch import load_file

    from tests.hf.hf_testutil import make_hf_model

    src = make_hf_model(tmp_path / name, "gpt2")
    tensors = load_file(str(src / "model.safetensors"))
    (src / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for file, keys in shards.items():
        save_file({k: tensors[k].contiguous() for k in keys}, str(src / file))
    index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    return src


def test_a_damaged_shard_or_index_is_a_sentence_not_a_traceback(tmp_path, capsys):
    """A pass: a truncated shard of a sharded checkpoint, and an index that puts a tensor in the wrong shard,
    were tracebacks (SafetensorError, KeyError); a single model.safetensors truncated the same way had its
    sentence. Nothing is left behind."""
    src = _two_shards(tmp_path, "ok")
    assert main(["import", str(src), "--out", str(tmp_path / "out-ok")]) == 0
    err = capsys.readouterr().err  # (GPT-2's configs carry them; fuyou trained without them in silence)
    assert "sets dropout (attn_pdrop=0.1, embd_pdrop=0.1, resid_pdrop=0.1); fuyou trains without dropout" in err
    shard = src / "model-00002-of-00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[:100])
    assert main(["import", str(src), "--out", str(tmp_path / "out-trunc")]) == 2
    err = capsys.readouterr().err
    assert f"cannot read {shard} as safetensors" in err and "truncated or corrupt" in err and "Traceback" not in err
    assert main(["train", "--init-from", str(src), "train.steps=1", "--out", str(tmp_path / "runs")]) == 2
    assert "truncated or corrupt" in capsys.readouterr().err
    shard.write_bytes(data)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    moved = next(k for k, f in index["weight_map"].items() if f.startswith("model-00002") and k.endswith(".weight"))
    index["weight_map"][moved] = "model-00001-of-00002.safetensors"
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    assert main(["import", str(src), "--out", str(tmp_path / "out-index")]) == 2
    assert (f"lists {moved!r} in model-00001-of-00002.safetensors, which does not hold it; the index and the weight "
            f"files disagree") in capsys.readouterr().err
    assert not any((tmp_path / f"out-{n}").exists() for n in ("trunc", "index"))


def test_import_names_what_it_was_given_in_place_of_a_model_directory(tmp_path, capsys):
    """A pass: `fuyou import DIR/config.json` said the path had "no config.json"; a run directory, a config with
    neither architectures nor model_type ("architecture model_type None"), and an export of an adapter
    given to export got sentences that did not say what they were."""
    src = hf_dir(tmp_path / "m", LLAMA)
    for given, says in ((src / "config.json", f"is a file: give its directory, {src}"),
                        (src / "model.safetensors", "is a file; `fuyou import` reads a local Hugging Face model")):
        assert main(["import", str(given), "--out", str(tmp_path / "out")]) == 2
        assert says in capsys.readouterr().err
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text("[model]\npreset = 'gpt-test'\n")
    assert main(["import", str(run), "--out", str(tmp_path / "out")]) == 2
    assert f"is a fuyou run directory, which needs no import: train from it with fuyou train --init-from {run}" in \
        capsys.readouterr().err
    bare = hf_dir(tmp_path / "bare", {k: v for k, v in LLAMA.items() if k not in ("architectures", "model_type")})
    assert main(["import", str(bare), "--out", str(tmp_path / "out")]) == 2
    assert "has neither architectures nor model_type, so it names no architecture" in capsys.readouterr().err
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    assert main(["export", str(adapter), "--out", str(tmp_path / "out")]) == 2
    assert "is a PEFT adapter directory (an export of a LoRA run, or PEFT's own), not a fuyou run" in \
        capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_gpt_checkpoint_of_fewer_positions_says_the_sequence_it_trains_and_plans(tmp_path, capsys):
    """A GPT checkpoint of 64 positions: train's default data.seq_len (128) and plan's --seq (1024) are beyond
    them. Train lowered it without a word, plan refused its own default; both now take the positions and say so.
    A sequence given is checked as given."""
    pytest.importorskip("transformers")
    from hf_testutil import make_hf_model

    src = make_hf_model(tmp_path / "gpt2", "gpt2")
    cfg = load_config(overrides=[f"model.init_from={src}"])
    assert cfg.data.seq_len == 64
    assert f"note: data.seq_len=64, the positions of model.init_from={src}" in capsys.readouterr().err
    plan = ["plan", "--model", str(src), "--gpu", "rtx4090", "--ssd", "1x990-pro", "--cpu-mem", "4GiB"]
    assert main(plan) == 0
    out = capsys.readouterr()
    assert "planned with --seq 64, the model's positions" in out.err and "batch 16 x seq 64" in out.out, out.out[:600]
    assert main([*plan, "--seq", "128"]) == 2
    assert "--seq 128 is beyond the checkpoint's 64 learned positions" in capsys.readouterr().err
    conf = tmp_path / "run.toml"  # a file silent on data.seq_len: train's default, lowered as train lowers it
    conf.write_text(f'[model]\ninit_from = "{src}"\n')
    assert main(["plan", "--config", str(conf), *plan[3:]]) == 0
    out = capsys.readouterr()
    assert "planned with --seq 64, the model's positions" in out.err and "batch 16 x seq 64" in out.out, out.err
