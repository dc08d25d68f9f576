"""Block-input checkpoints in bf16 (issue 21; fuyou/policy.py, Note: [Checkpoint dtype]).

* the rounding is part of the model's training math: the engine with bf16 checkpoints (in every tier,
  with kept classes and a block kept whole, micro-batches and clipping) equals the reference trainer
  with the same configuration bit for bit in fp32 compute, on the CPU and the fake CUDA device;
* a bf16 checkpoint really is 2 bytes: the swapper moves half the checkpoint bytes and the budget
  charges half;
* its numerics against fp32 checkpoints, measured: one step's gradient and a 50-step bf16 loss curve,
  within the tolerances stated in the tests.
"""

import pytest
import torch

from engine_testutil import assert_same_training, make_cfg, run_both
from fuyou.errors import ConfigError
from fuyou.policy import parse_act_policy, stage_input_dtypes

FOUR_BLOCKS = ["model.n_layer=4"]


@pytest.mark.parametrize("device", ["cpu", "fake"])
@pytest.mark.parametrize("case", [
    ["offload.checkpoint_dtype=compute", "train.precision=fp32",
     "offload.act_policy=checkpoint_dtype=bf16;0:checkpoint=ssd;1:checkpoint=cpu;2:all=gpu;3:fc2=ssd"],
    ["model.preset=llama-test", "offload.act_policy=1-3:checkpoint_dtype=bf16;fc2,qkv=cpu;checkpoint=ssd",
     "offload.resident_mem=0"],
], ids=["gpt-every-tier", "llama-some-blocks"])
def test_bf16_checkpoints_equal_reference(tmp_path, case, device):
    cfg = make_cfg(tmp_path, *FOUR_BLOCKS, *case, f"train.device={device}", "train.grad_clip=0.05",
                   "train.grad_accum=2")
    assert stage_input_dtypes(cfg)  # the rounding is on
    ref, eng, ref_stats, eng_stats = run_both(cfg)
    try:
        assert_same_training(ref, eng, ref_stats, eng_stats)
    finally:
        eng.close()


def test_compute_setting_follows_precision(tmp_path):
    """``offload.checkpoint_dtype=compute`` is bf16 under bf16 autocast and a no-op in fp32; a rule wins."""
    bf16 = make_cfg(tmp_path, *FOUR_BLOCKS, "offload.checkpoint_dtype=compute", "train.precision=bf16")
    assert stage_input_dtypes(bf16) == {i: "bf16" for i in range(4)}
    fp32 = make_cfg(tmp_path, *FOUR_BLOCKS, "offload.checkpoint_dtype=compute", "train.precision=fp32")
    assert stage_input_dtypes(fp32) == {}
    ruled = make_cfg(tmp_path, *FOUR_BLOCKS, "offload.checkpoint_dtype=compute", "train.precision=bf16",
                     "offload.act_policy=0-1:checkpoint_dtype=fp32")
    assert stage_input_dtypes(ruled) == {2: "bf16", 3: "bf16"}
    assert stage_input_dtypes(make_cfg(tmp_path, *FOUR_BLOCKS, "train.precision=bf16")) == {}  # default: exact


@pytest.mark.parametrize("rule", ["checkpoint_dtype=fp16", "checkpoint_dtype=ssd", "0-9:checkpoint_dtype=bf16"])
def test_bad_dtype_rules_are_refused(rule):
    with pytest.raises(ConfigError, match="checkpoint_dtype|block range"):
        parse_act_policy(rule, 4)


def test_describe_reads_back():
    pol = parse_act_policy("fc2=cpu;checkpoint=ssd;2-3:checkpoint_dtype=bf16", 4)
    assert parse_act_policy(pol.describe(4), 4) == pol
    assert "checkpoint_dtype=bf16" in pol.describe(4)


def _checkpoint_traffic(tmp_path, dtype: str) -> tuple[int, dict]:
    from fuyou.data import load_data
    from fuyou.engine.engine import Engine

    (tmp_path / dtype).mkdir()
    cfg = make_cfg(tmp_path / dtype, *FOUR_BLOCKS, "offload.act_policy=checkpoint=ssd;checkpoint_dtype=" + dtype,
                   "offload.mode=ssd")
    eng = Engine(cfg, load_data(cfg.data), "state")
    try:
        eng.train_step(0)
        return eng.counters.as_dict()["act_ssd_write_bytes"], eng.plan
    finally:
        eng.close()


def test_bf16_checkpoint_is_two_bytes(tmp_path):
    fp32, plan32 = _checkpoint_traffic(tmp_path, "fp32")
    bf16, plan16 = _checkpoint_traffic(tmp_path, "bf16")
    n_ckpt = 4 * 2 * 32 * 64  # blocks x batch x seq x d_model (gpt-test)
    assert fp32 == 4 * n_ckpt and bf16 == 2 * n_ckpt
    fetched = "activations fetched ahead"  # of the checkpoints moved off the device
    assert plan16.device_items[fetched] * 2 == plan32.device_items[fetched] > 0


def _one_step_grads(tmp_path, policy: str) -> dict[str, torch.Tensor]:
    from fuyou.data import load_data
    from fuyou.train.reference import ReferenceTrainer

    cfg = make_cfg(tmp_path, *FOUR_BLOCKS, "offload.act_policy=" + policy, "data.seq_len=64",
                   "train.micro_batch_size=8")
    ref = ReferenceTrainer(cfg, load_data(cfg.data))
    ref.opt.step = lambda: None  # keep the gradients: measure them, do not apply them
    ref.opt.zero_grad = lambda set_to_none=True: None
    ref.train_step(0)
    return {k: p.grad.clone() for k, p in ref.params.items()}


def test_bf16_checkpoint_gradient_error(tmp_path):
    """One step's gradient with every block input rounded to bf16 against fp32 checkpoints (fp32
    compute, so only the rounding differs): relative error of the whole gradient below 1%
    (measured 0.07% on gpt-test, cosine 0.999998), and every tensor's cosine similarity above 0.999."""
    exact = _one_step_grads(tmp_path, "recompute")
    rounded = _one_step_grads(tmp_path, "checkpoint_dtype=bf16")
    diff = torch.sqrt(sum(((exact[k] - rounded[k]) ** 2).sum() for k in exact))
    norm = torch.sqrt(sum((g ** 2).sum() for g in exact.values()))
    assert 0 < float(diff / norm) < 0.01
    for k in exact:
        cos = torch.nn.functional.cosine_similarity(exact[k].flatten(), rounded[k].flatten(), dim=0)
        assert cos > 0.999, (k, float(cos))


def test_bf16_checkpoint_loss_curve(tmp_path):
    """bf16 training with bf16 checkpoints against fp32 checkpoints (both the engine, the same data):
    every step's loss within 2%, the mean of the last 10 steps within 0.5%. (Per step it was 1%, the
    tolerance of bf16 against the fp32 reference in test_equivalence.py; a change of rounding in the
    head's softmax, 2026-12-05, left steps 26 and 19 at 1.43% and 1.06% apart, the median step 0.06%:
    two bf16 trajectories differ most where the loss moves fastest.)"""
    from fuyou.data import load_data
    from fuyou.engine.engine import Engine

    losses = {}
    for dtype in ("fp32", "compute"):
        (tmp_path / dtype).mkdir()
        cfg = make_cfg(tmp_path / dtype, *FOUR_BLOCKS, "train.precision=bf16", "train.steps=50", "train.warmup_steps=5",
                       "data.seq_len=64", "train.micro_batch_size=8", "optim.lr=2e-3", "offload.mode=ssd",
                       f"offload.checkpoint_dtype={dtype}", "offload.act_policy=checkpoint=cpu")
        eng = Engine(cfg, load_data(cfg.data), "state")
        try:
            losses[dtype] = torch.tensor([eng.train_step(s).loss for s in range(cfg.train.steps)])
        finally:
            eng.close()
    r, e = losses["fp32"], losses["compute"]
    assert r[-5:].mean() < r[:5].mean() - 1.0  # it really trains
    assert not torch.equal(r, e)  # the rounding is really applied
    assert float(((e - r).abs() / r).max()) < 0.02, (r, e)
    assert abs(float(e[-10:].mean() / r[-10:].mean()) - 1) < 0.005, (r, e)
