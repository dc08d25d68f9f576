"""Today's model families through fuyou (issue 20): Llama 3.1 (llama3 RoPE scaling), Llama 3.2 (tied
embeddings, a head width apart from width/heads), Qwen2.5 (tied, Q/K/V biases), Qwen3 (q/k norms, head
width apart), Mistral with a sliding window shorter than the sequences.

For each, a tiny random checkpoint made with transformers (``hf_testutil.hf_config``): imported, fuyou's
loss and logits equal transformers' (fp32; measured on CPU: logits equal to the last bit, the loss
within one ulp, 4.8e-7); a short fuyou run fine-tunes it; the export loads in transformers with fuyou's
logits (equal to the last bit) and maps back to the same shape. Packed rows (positions restarting at 0
per document) give each document's logits alone (measured 7.8e-7: masked vs plain attention kernels).
Nothing is downloaded."""

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from hf_testutil import (LLAMA3_ROPE, WINDOW, finetune, fuyou_weights, hf_logits, load_hf,  # noqa: E402
                         make_hf_model, packed_logits, read_json, tokens, write_fuyou_run)

from fuyou.cli import main  # noqa: E402
from fuyou.hf import export_run  # noqa: E402
from fuyou.hf.config_map import to_fuyou, to_hf  # noqa: E402
from fuyou.models import ModelConfig, StageModel, preset  # noqa: E402
from fuyou.train.run import import_checkpoint  # noqa: E402

FAMILIES = ["llama3.1", "llama3.2", "qwen2.5", "qwen3", "mistral-sw"]
_LLAMA3 = {"type": "llama3", **{k: v for k, v in LLAMA3_ROPE.items() if k != "rope_type"}}
# What each import must set (beyond the shared shape), and the field whose removal must change the logits
# (the test's sequences are long enough for the scaling and the window to matter).
EXPECTED = {
    "llama3.1": ({"rope_scaling": _LLAMA3, "d_head": None, "tie_embeddings": False}, {"rope_scaling": None}),
    "llama3.2": ({"rope_scaling": {**_LLAMA3, "factor": 32.0}, "d_head": 32, "tie_embeddings": True},
                 {"rope_scaling": None}),
    "qwen2.5": ({"attn_bias": True, "tie_embeddings": True, "sliding_window": None, "rope_theta": 1e6}, {}),
    "qwen3": ({"qk_norm": True, "d_head": 32, "attn_bias": False, "tie_embeddings": False}, {"qk_norm": False}),
    "mistral-sw": ({"sliding_window": WINDOW}, {"sliding_window": None}),
}
TOL = dict(rtol=0, atol=1e-4)  # logits, as tests/hf/test_hf_import_export.py


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {kind: make_hf_model(root / kind, kind) for kind in FAMILIES}


def _targets(x: torch.Tensor) -> torch.Tensor:
    """Next-token targets of ``x`` for fuyou's head (-100 at the end): transformers' ``labels=x``."""
    return torch.cat([x[:, 1:], torch.full_like(x[:, :1], -100)], dim=1)


@pytest.mark.parametrize("kind", FAMILIES)
def test_import_gives_transformers_loss_and_logits(hf_models, tmp_path, kind):
    src = hf_models[kind]
    cfg, params = fuyou_weights(import_checkpoint(src, tmp_path / "run") / "model.safetensors")
    fields, feature = EXPECTED[kind]
    assert {k: v for k, v in cfg.model_dump().items() if k in fields} == fields
    x = tokens()
    assert x.shape[1] > WINDOW
    model = StageModel(cfg)
    ours = model.logits(params, x)
    hf = load_hf(src)
    with torch.no_grad():
        out = hf(x, labels=x)
        loss = model.forward_loss(params, x, _targets(x))
    torch.testing.assert_close(ours, out.logits.float(), **TOL)
    torch.testing.assert_close(loss, out.loss.float(), rtol=0, atol=1e-6)
    if feature:  # the feature is exercised: without it the logits differ
        plain = ModelConfig(**{**cfg.model_dump(), **feature})
        with torch.no_grad():
            assert (StageModel(plain).logits(params, x) - ours).abs().max() > 1e-3


@pytest.mark.parametrize("kind,offload", [("llama3.1", False), ("llama3.2", True), ("qwen2.5", False),
                                          ("qwen3", True), ("mistral-sw", True)])
def test_finetune_then_export_loads_in_transformers(hf_models, tmp_path, kind, offload):
    src = hf_models[kind]
    run = finetune(tmp_path, ["--init-from", str(src)], offload)
    _, start = fuyou_weights(import_checkpoint(src, tmp_path / "imported") / "model.safetensors")
    cfg, trained = fuyou_weights(run / "model.safetensors")
    moved = max(float((trained[k] - start[k]).abs().max()) for k in start)
    assert 0 < moved < 0.01  # 3 Adam steps of <= lr from the Hugging Face weights

    out = tmp_path / "export"
    assert main(["export", str(run), "--out", str(out)]) == 0
    x = tokens()
    torch.testing.assert_close(hf_logits(out, x), StageModel(cfg).logits(trained, x), **TOL)
    # The exported config describes the source's architecture and shape, in the source's spelling.
    exported, source = read_json(out / "config.json"), read_json(src / "config.json")
    assert exported["architectures"] == source["architectures"]
    assert to_fuyou(exported) == to_fuyou(source)
    assert ("rope_parameters" in exported) == ("rope_parameters" in source)
    if cfg.tie_embeddings:
        from safetensors import safe_open

        with safe_open(str(out / "model.safetensors"), framework="pt") as f:
            assert "lm_head.weight" not in f.keys()


@pytest.mark.parametrize("kind", ["llama3.1", "qwen3"])
def test_a_packed_row_gives_each_documents_logits(hf_models, tmp_path, kind):
    # Two rows of 40 tokens, packed differently; fuyou's `pos` restarts at 0 at each document.
    cfg, params = fuyou_weights(import_checkpoint(hf_models[kind], tmp_path / "run") / "model.safetensors")
    x = tokens(2, 40)
    splits = [(9, 17, 14), (25, 15)]
    pos = torch.stack([torch.cat([torch.arange(n) for n in lengths]) for lengths in splits])
    ours = packed_logits(cfg, params, x, pos)
    hf = load_hf(hf_models[kind])
    for row, lengths in enumerate(splits):
        start = 0
        for n in lengths:
            with torch.no_grad():
                alone = hf(x[row:row + 1, start:start + n]).logits.float()
            torch.testing.assert_close(ours[row:row + 1, start:start + n], alone, rtol=0, atol=1e-5)
            start += n
    # Packing matters: the same rows unpacked (one document each) differ after the first document.
    assert (StageModel(cfg).logits(params, x) - ours)[:, 9:].abs().max() > 1e-3


@pytest.mark.parametrize("update,arch", [
    ({"rope_scaling": _LLAMA3, "max_seq_len": 256}, "LlamaForCausalLM"),
    ({"rope_scaling": {"type": "linear", "factor": 4.0}, "d_head": 32}, "LlamaForCausalLM"),
    ({"d_head": 32, "qk_norm": True, "tie_embeddings": True}, "Qwen3ForCausalLM"),
    ({"sliding_window": WINDOW}, "MistralForCausalLM"),
    ({"attn_bias": True, "sliding_window": WINDOW}, "Qwen2ForCausalLM"),
    ({"qk_norm": True, "sliding_window": WINDOW, "rope_scaling": _LLAMA3, "max_seq_len": 256}, "Qwen3ForCausalLM"),
    # a width its heads do not divide: LlamaConfig refuses it (head_dim or not), Mistral's computes it (a pass)
    ({"d_model": 72, "n_head": 5, "n_kv_head": 1, "d_head": 10}, "MistralForCausalLM"),
])
def test_export_of_a_model_trained_from_scratch(tmp_path, update, arch):
    # No template: the architecture is the one that computes the model, in v4's spelling (v5 reads it).
    cfg = ModelConfig(**{**preset("llama-test"), **update})
    params = {k: v + 0.01 * torch.randn_like(v) for k, v in StageModel(cfg).init_params(seed=5).items()}
    export_run(write_fuyou_run(tmp_path / "run", cfg, params), tmp_path / "out")
    hf = read_json(tmp_path / "out" / "config.json")
    assert hf["architectures"] == [arch]
    assert {k: v for k, v in to_fuyou(hf).items() if k in update} == \
        {k: v for k, v in cfg.model_dump().items() if k in update}
    x = tokens()
    torch.testing.assert_close(hf_logits(tmp_path / "out", x), StageModel(cfg).logits(params, x), **TOL)


@pytest.mark.parametrize("spelling", ["v4", "v5"])
def test_rope_scaling_is_written_in_the_templates_spelling(spelling):
    import transformers

    # Llama 3.1 8B's config.json as released (v4 spelling) and as transformers 5 writes it.
    v4 = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
          "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
          "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "bos_token_id": 128000,
          "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 8192, "rope_type": "llama3"}}
    template = v4 if spelling == "v4" else {
        **{k: v for k, v in v4.items() if k not in ("rope_theta", "rope_scaling")},
        "rope_parameters": {**v4["rope_scaling"], "rope_theta": 500000.0}}
    fields = to_fuyou(template)
    assert fields == {k: v for k, v in ModelConfig(**preset("llama3.1-8b")).model_dump().items() if k in fields}
    out = to_hf(ModelConfig(**fields), "bf16", template)
    assert out["bos_token_id"] == 128000 and ("rope_parameters" in out) == (spelling == "v5")
    assert ("rope_scaling" in out) == (spelling == "v4")
    params = transformers.LlamaConfig(**out).rope_parameters
    assert params == {**v4["rope_scaling"], "rope_theta": 500000.0}


def test_a_gpt2_checkpoint_of_few_positions_imports_and_plans_within_them(tmp_path, capsys):
    """fuyou import wrote data.seq_len=128 for a 64-position GPT-2, so the printed next step (fuyou train
    --config RUN/config.toml) failed at once; fuyou plan --seq 128 told the user to raise model.max_seq_len,
    which fuyou train then undid from the checkpoint and refused."""
    from fuyou.cli import main
    from fuyou.config import load_config

    from hf_testutil import make_hf_model

    gpt2 = make_hf_model(tmp_path / "gpt2", "gpt2")
    run = import_checkpoint(gpt2, tmp_path / "imp")
    cfg = load_config(run / "config.toml")
    assert cfg.model.max_seq_len == 64 and cfg.data.seq_len == 64
    assert main(["plan", "--model", str(gpt2), "--gpu", "rtx4090", "--ssd", "1x990-pro", "--cpu-mem",
                 "4GiB", "--seq", "128"]) == 2
    assert "beyond the checkpoint's 64 learned positions" in capsys.readouterr().err


@pytest.mark.parametrize("arch,config_cls", [("LlamaForCausalLM", "LlamaConfig"), ("Qwen2ForCausalLM", "Qwen2Config"),
                                             ("MistralForCausalLM", "MistralConfig")])
def test_a_config_json_without_optional_keys_reads_as_transformers_does(arch, config_cls):
    """Keys a config.json may leave out take transformers' defaults (rope_theta; Qwen2's max_window_layers,
    from which layer on the sliding window applies): a default of ours that differed passed every test (a
    mutation audit), and would train another model than the one transformers loads."""
    transformers = pytest.importorskip("transformers")
    defaults = getattr(transformers, config_cls)()
    base = {"architectures": [arch], "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
            "intermediate_size": 128, "num_hidden_layers": 4, "vocab_size": 100, "max_position_embeddings": 64}
    assert to_fuyou(base)["rope_theta"] == float(getattr(defaults, "rope_theta", None)
                                                 or defaults.rope_parameters["rope_theta"])
    if arch == "Qwen2ForCausalLM":  # the window from layer max_window_layers on: none of 4 layers, all of 40 but 28
        windowed = {**base, "use_sliding_window": True, "sliding_window": 16}
        assert defaults.max_window_layers == 28 and to_fuyou(windowed)["sliding_window"] is None
        from fuyou.errors import ConfigError

        with pytest.raises(ConfigError, match="12 of 40 layers use sliding-window attention"):
            to_fuyou({**windowed, "num_hidden_layers": 40})
