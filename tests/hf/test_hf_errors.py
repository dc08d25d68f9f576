"""What fuyou refuses to import, and that it says what to do instead. Only config.json and small
files are written here (no transformers needed), so these run without the hf extra."""

import json

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
    for arch in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "GPT2LMHeadModel"):
        assert arch in str(e.value)
    assert main(["import", str(src), "--out", str(tmp_path / "out")]) == 2
    assert "not supported" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("update,match", [
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "RoPE scaling 'llama3' is not supported"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6}}, "RoPE scaling 'yarn'"),
    ({"architectures": ["MistralForCausalLM"], "model_type": "mistral", "sliding_window": 16},
     "sliding-window attention"),
    ({"head_dim": 32}, "head_dim=32"),
    ({"attention_bias": True}, "O-projection bias"),
    ({"hidden_act": "gelu"}, "SwiGLU"),
    ({"quantization_config": {"quant_method": "gptq"}}, "quantized"),
    ({"hidden_size": None}, "lacks hidden_size"),
])
def test_configs_fuyou_does_not_compute_are_refused(update, match):
    with pytest.raises(ConfigError, match=match):
        to_fuyou({**LLAMA, **update})


def test_accepted_spellings():
    v5 = {**LLAMA, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}
    del v5["rope_theta"], v5["rope_scaling"]
    assert to_fuyou(v5)["rope_theta"] == 5e5
    # A sliding window as long as the context is plain causal attention (Mistral v0.2 and later: null).
    mistral = {**LLAMA, "architectures": ["MistralForCausalLM"], "sliding_window": 64}
    assert to_fuyou(mistral)["family"] == "llama"
    assert to_fuyou({"model_type": "gpt2", "n_embd": 64, "n_layer": 1, "n_head": 4})["tie_embeddings"] is True


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
    cfg = load_config(overrides=["model.preset=gpt-test", "model.n_layer=3"], flags={"model.init_from": str(src)})
    assert (cfg.model.family, cfg.model.n_layer, cfg.model.vocab_size, cfg.model.preset) == ("llama", 1, 32, None)
    err = capsys.readouterr().err
    assert "preset 'gpt-test' ignored" in err and "n_layer 3 -> 1" in err
    assert cfg.data.tokenizer == "byte"  # no tokenizer files in the source


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
