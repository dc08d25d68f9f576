"""bench/zero_infinity.py: the wrapper is fuyou's model (in-process, no DeepSpeed needed), and a 2-step
ZeRO-Infinity run on gpt-test starts from fuyou's loss (subprocess, only where deepspeed is importable)."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fuyou.data import SyntheticBatches
from fuyou.models import ModelConfig, StageModel, preset

BENCH = Path(__file__).resolve().parents[2] / "bench" / "zero_infinity.py"
SEED = 1234


def _load_bench():
    spec = importlib.util.spec_from_file_location("zero_infinity_bench", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("name", ["gpt-test", "llama-test"])
def test_wrapper_is_fuyous_model(name):
    """Plain PyTorch, fp32: the nn.Module wrapper computes fuyou's loss and gradients exactly."""
    zi = _load_bench()
    model = StageModel(ModelConfig(**preset(name)))
    init = model.init_params(SEED)
    net = zi.FuyouAsModule(model, init)
    net.tie(None)
    named = dict(net.named_fuyou_parameters())
    assert named.keys() == model.param_specs().keys()
    assert sum(p.numel() for p in net.parameters()) == model.num_params  # the tied head adds none
    x, y, _ = SyntheticBatches(model.cfg.vocab_size, 16, 2, SEED).batch(0)
    loss = net(x, y)
    params = {k: v.clone().requires_grad_(True) for k, v in init.items()}
    ref = model.forward_loss(params, x, y)
    assert torch.equal(loss, ref)
    loss.backward()
    ref.backward()
    for k, p in named.items():
        assert torch.equal(p.grad, params[k].grad), k


def test_config_buffers_cover_the_largest_parameter():
    zi = _load_bench()
    model = StageModel(ModelConfig(**preset("gpt3-125m")))
    args = zi.parse_args(["--model", "gpt3-125m", "--seq", "512"])
    cfg = zi.ds_config(model, args, zi.AdamWConfig())["zero_optimization"]
    largest = max(s.numel for s in model.param_specs().values())
    assert cfg["offload_param"]["buffer_size"] >= largest
    assert cfg["sub_group_size"] <= cfg["offload_param"]["buffer_size"]  # fp32 init goes through these buffers
    assert cfg["offload_param"]["buffer_count"] >= 16 and cfg["offload_optimizer"]["buffer_count"] >= 12


@pytest.mark.parametrize("name,precision", [("gpt-test", "bf16"), ("gpt-tiny", "bf16"), ("gpt-tiny", "fp32")])
def test_two_steps_start_from_fuyous_loss(tmp_path, name, precision):
    """gpt-test is the model of the brief; DeepSpeed never swaps a tensor under 1 MiB (MIN_AIO_BYTES),
    so only gpt-tiny's optimizer state really goes through the NVMe directory. In fp32 (no bf16 section)
    step 0's loss is fuyou's within fp32 rounding."""
    pytest.importorskip("deepspeed")
    out_json = tmp_path / "zinf.json"
    batch, seq = 2, 32
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--model", name, "--batch", str(batch), "--seq", str(seq),
         "--steps", "2", "--warmup", "1", "--nvme-dir", str(tmp_path / "nvme"), "--json", str(out_json),
         "--precision", precision],
        capture_output=True, text=True, timeout=900, cwd=tmp_path)  # ops are built on first use (minutes)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out_json.read_text())
    model = StageModel(ModelConfig(**preset(name)))
    x, y, _ = SyntheticBatches(model.cfg.vocab_size, seq, batch, SEED).batch(0)
    with torch.no_grad():
        ref = float(model.forward_loss(model.init_params(SEED), x, y))
    assert len(res["losses"]) == 2 and all(math.isfinite(v) for v in res["losses"])
    tol = 0.03 if precision == "bf16" else 1e-4  # bf16 weights and compute vs fp32; fp32 vs fp32
    assert res["losses"][0] == pytest.approx(ref, abs=tol) and res["precision"] == precision
    assert res["reference_loss_step0"] == pytest.approx(ref, abs=tol)
    assert res["settings"]["deepspeed_config"]["bf16"]["enabled"] == (precision == "bf16")
    if name == "gpt-tiny":  # the timed step read and wrote optimizer state in the NVMe directory
        assert res["write_bytes_timed"] > 0 and res["read_bytes_timed"] > 0
    assert res["tokens_per_s"] > 0 and res["peak_rss_bytes"] > 0
    assert res["versions"]["deepspeed"] and res["settings"]["deepspeed_config"]["zero_optimization"]["stage"] == 3
