"""LoRA's int8 base (fuyou/models/quant.py): the quantisation's error bound, the packed layout, the bytes
the engine streams and the planner counts, and the settings it refuses."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from fuyou.config import load_config
from fuyou.errors import ConfigError
from fuyou.models import StageModel
from fuyou.models.config import ModelConfig
from fuyou.models.quant import (NF4_LEVELS, PackedStage, dequantise_nf4, dequantise_rows, fake_quantise, packed_bytes,
                                quantise_nf4, quantise_rows, quantised_names)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))


def test_rows_round_to_the_nearest_code_within_half_a_step():
    w = torch.randn(64, 96) * torch.logspace(-3, 1, 64)[:, None]  # rows of very different sizes
    w[5] = 0.0                                                      # and one of zeros
    codes, scale = quantise_rows(w)
    assert codes.dtype == torch.int8 and scale.shape == (64,)
    assert int(codes.abs().max()) == 127 and int(codes[5].abs().max()) == 0 and float(scale[5]) == 0.0
    back = dequantise_rows(codes, scale, torch.float32)
    err = (back - w).abs()
    assert bool((err <= scale[:, None] / 2 * (1 + 1e-6) + 1e-12).all())  # per row: half a step of its scale
    # each row's largest entry is exact up to fp32 rounding: it defines the scale
    assert torch.allclose(back.abs().amax(1), w.abs().amax(1), rtol=1e-6)


@pytest.mark.parametrize("shape", [(1, 1), (3, 17), (5, 70_001), (70_001, 3), (64, 2048)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_dequantisation_kernel_gives_torchs_bits(shape, dtype):
    """The CPU kernel (adamw.cpp ``fuyou_dequant_rows``) against the mixed-dtype torch op it replaces:
    the same bits, whatever the shape (rows longer and shorter than a work block), into new memory or
    into a slice of a scratch buffer."""
    from fuyou.kernels.build import load_adamw_lib

    if load_adamw_lib() is None:
        pytest.skip("the kernel library did not build here (its fallback is the torch op itself)")
    rows, cols = shape
    codes = torch.randint(-127, 128, shape, dtype=torch.int8)
    scale = torch.randn(rows).abs() * torch.logspace(-6, 1, rows)
    want = torch.mul(codes, scale[:, None], out=torch.empty(shape, dtype=dtype))
    assert torch.equal(dequantise_rows(codes, scale, dtype), want)
    scratch = torch.full((rows * cols + 9,), float("nan"), dtype=dtype)
    got = dequantise_rows(codes, scale, dtype, scratch[9:].view(rows, cols))
    assert got.data_ptr() == scratch[9:].data_ptr() and torch.equal(got, want)
    assert bool(scratch[:9].isnan().all())  # nothing written outside its slice


@pytest.mark.parametrize("shape", [(1, 1), (3, 17), (5, 70_001), (7, 3), (300, 2048)])
def test_the_quantisation_kernels_give_the_torch_formulas_bits(shape):
    """``fuyou_quant_rows`` / ``fuyou_quant_nf4`` (adamw.cpp) against the torch formulas that define the
    formats (the fallback without the library): codes and scales equal, ties and zeros included."""
    from fuyou.kernels.build import load_adamw_lib

    if load_adamw_lib() is None:
        pytest.skip("the kernel library did not build here")
    rows, cols = shape
    w = torch.randn(shape) * torch.logspace(-4, 1, rows)[:, None]
    w[0, 0] = 0.0
    if cols >= 4:  # a row of scale 1: halves round to even
        w[-1, :4] = torch.tensor([127.0, 2.5, -3.5, 0.5])
    if rows > 2:
        w[1] = 0.0
    for f in (quantise_rows, quantise_nf4):
        got, want = f(w), f(w, kernel=False)
        assert all(torch.equal(a, b) for a, b in zip(got, want)), f.__name__


def _paths():
    """The kernel library's paths this CPU can run (one it lacks would silently run a lower one)."""
    from fuyou.optim.adamw import _ISA, adamw_backend

    best = _ISA.get(adamw_backend(), -1)
    return [b for b in ("avx512", "avx2", "scalar") if _ISA[b] <= best]


def test_nf4_takes_the_nearest_level_of_each_block():
    levels = torch.tensor(NF4_LEVELS)
    absmax = torch.tensor([2.0, 0.5, 0.0, 3e-3])
    exact = levels.repeat(4)[None, :].expand(4, 64) * absmax[:, None]  # every level in every block
    w = torch.cat([exact.reshape(-1), torch.randn(100) * 0.1])         # and a partial last block
    codes, am = quantise_nf4(w)
    assert codes.dtype == torch.uint8 and codes.numel() == 6 * 32 and am.numel() == 6
    assert torch.equal(am[:4], absmax) and float(am[5]) > 0
    back = dequantise_nf4(codes, am, w.numel(), torch.float32)
    assert torch.equal(back[:256], exact.reshape(-1))  # a level times its block's absmax comes back exactly
    gaps = (levels[1:] - levels[:-1]).max() / 2
    blockmax = am.repeat_interleave(64)[:w.numel()]
    assert bool(((back - w).abs() <= gaps * blockmax * (1 + 1e-6)).all())
    # the torch path and each of the kernel's paths agree bit for bit, fp32 and bf16 (odd lengths: a partial
    # block, and within it a tail shorter than a vector)
    for n in (1, 63, 65, 64 * 1500 + 7, 64 * 3 + 45):
        x = torch.randn(n) * 0.02
        c, a = quantise_nf4(x)
        levels_t = levels[torch.stack([c & 15, c >> 4], 1).view(-1, 64).long()]
        want = (levels_t * a[:, None]).view(-1)[:n]
        for dt in (torch.float32, torch.bfloat16):
            for backend in (None, *_paths(), "torch"):
                assert torch.equal(dequantise_nf4(c, a, n, dt, backend=backend), want.to(dt)), (n, dt, backend)
    with pytest.raises(ValueError, match="dequantise_nf4"):
        dequantise_nf4(codes, am, w.numel() + 64, torch.float32)


@pytest.mark.parametrize("kind", ["int8", "nf4", "nf4dq"])
@pytest.mark.parametrize("family", ["gpt", "llama"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_packed_stage_unpacks_to_what_the_reference_trains(family, dtype, kind):
    model = StageModel(ModelConfig(family=family, n_layer=2, d_model=64, n_head=4, vocab_size=128, max_seq_len=32))
    emb, block, head = model.stages[0], model.stages[1], model.stages[-1]
    csize = torch.empty((), dtype=dtype).element_size()
    assert PackedStage.of(emb, csize, kind) is None and PackedStage.of(head, csize, kind) is None  # compute dtype
    assert quantised_names(block) == [f"{n}.weight" for n in (["qkv", "proj", "fc1", "fc2"] if family == "gpt"
                                                              else ["q", "k", "v", "o", "gate", "up", "down"])]
    layout = PackedStage.of(block, csize, kind)
    values = block.init_params(0)
    flat = layout.pack({n: values[block.key(n)] for n in block.params}, torch.empty(layout.numel, dtype=dtype))
    out = layout.unpack(flat)
    assert list(out) == list(block.params)                         # slot order
    again = layout.unpack(flat, torch.empty(layout.dequant_numel, dtype=dtype))  # into the engine's scratch
    assert all(torch.equal(again[n], out[n]) for n in out)
    ref = fake_quantise(block, values, kind)
    for n, v in out.items():
        assert v.dtype == dtype and v.shape == block.params[n].shape
        assert torch.equal(v, ref[block.key(n)].to(dtype)), n          # bit for bit what the reference uses
        if n not in layout.quantised:
            assert torch.equal(v, values[block.key(n)].to(dtype))     # norms and biases untouched
    # int8: a byte a parameter and a 4-byte scale per row; nf4: half a byte and 4 bytes per 64; 64-byte
    # alignment; small params in the dtype
    matmul = sum(block.params[n].numel for n in layout.quantised)
    rows = sum(block.params[n].shape[0] for n in layout.quantised)
    small = block.num_params - matmul
    want = csize * small + {"int8": matmul + 4 * rows, "nf4": matmul // 2 + 4 * (matmul // 64),
                            "nf4dq": matmul // 2 + matmul // 64}[kind]
    assert want <= layout.nbytes <= want + 64 * 2 * len(block.params)
    assert packed_bytes(block, csize, kind) == layout.nbytes and packed_bytes(emb, csize, kind) == csize * emb.num_params


def test_the_engine_streams_the_packed_bytes(tmp_path):
    """Base weights read from the SSD each step: about half of bf16's with an int8 base (the counted
    bytes are the packed stages'), and the memory plan is charged the packed size."""
    from engine_testutil import make_cfg, run_both

    counted = {}
    for base in ("compute", "int8", "nf4", "nf4dq"):
        (tmp_path / base).mkdir()
        cfg = make_cfg(tmp_path / base, "model.preset=llama-test", "model.n_layer=4", "lora.rank=4",
                       "lora.targets=all-linear", "train.precision=bf16", "offload.cache_weights=false",
                       "train.steps=1", f"lora.base={base}")
        ref, eng, rs, es = run_both(cfg)
        try:
            packed = sum(st.wnumel for st in eng.states) * 2
            # each stage read in forward and again in backward, the head once (its forward and backward are one)
            assert eng.counters.ssd_read_bytes == 2 * packed - 2 * eng.states[-1].wnumel
            counted[base] = eng.counters.ssd_read_bytes
            if base == "nf4":
                packed_nf4 = sum(st.wnumel for st in eng.states)
            if base != "compute":  # the blocks are packed to about a byte (half a byte) a parameter, the rest bf16
                assert all(st.wnumel / st.numel < (0.56 if base == "int8" else 0.32) for st in eng.states[1:-1])
                if base == "nf4dq":  # the absmax values double-quantised: fewer bytes than nf4's
                    assert sum(st.wnumel for st in eng.states) < packed_nf4
                assert [st.wnumel for st in (eng.states[0], eng.states[-1])] == [eng.states[0].numel, eng.states[-1].numel]
                assert "quantised base, a stage dequantised" in eng.plan.device_items
            assert abs(rs[0].loss - es[0].loss) <= 1e-4 * abs(rs[0].loss)
        finally:
            eng.close()
    ratio = counted["int8"] / counted["compute"]
    nf4 = counted["nf4"] / counted["compute"]
    print(f"base weights read per step: int8 / bf16 = {ratio:.3f}, nf4 / bf16 = {nf4:.3f}")
    assert 0.5 < ratio < 0.62  # (this tiny model's embedding and head, still bf16, weigh more than a large one's)
    assert 0.25 < nf4 < 0.45


def test_lora_base_is_refused_without_lora_and_fixed_on_resume():
    with pytest.raises(ConfigError, match="lora.base=int8 is set but lora.rank is 0"):
        load_config(overrides=["lora.base=int8"])
    with pytest.raises(ConfigError, match="lora.base"):
        load_config(overrides=["lora.rank=4", "lora.base=fp8"])
    from fuyou.train.run import resume_changes

    a = load_config(overrides=["lora.rank=4"])
    b = load_config(overrides=["lora.rank=4", "lora.base=int8"])
    with pytest.raises(ConfigError, match="lora.base"):
        resume_changes(a, b)


def test_the_planner_counts_the_packed_base():
    from fuyou.cli import main

    import contextlib
    import io
    import json

    out = {}
    for base in ("compute", "int8", "nf4", "nf4dq"):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            rc = main(["plan", "--model", "llama3-70b", "--gpu", "rtx4090", "--ssd", "1x990-pro", "--cpu-mem", "64GiB",
                       "--batch", "4", "--seq", "1024", "--json", "lora.rank=16", f"lora.base={base}"])
        assert rc in (0, None)
        out[base] = json.loads(buf.getvalue())
    print({b: (o["step_s"], o["ssd_bytes"]) for b, o in out.items()})
    assert [out[b]["lora_base"] for b in out] == ["compute", "int8", "nf4", "nf4dq"]
    assert 0.90 < out["nf4dq"]["base_bytes"] / out["nf4"]["base_bytes"] < 0.93  # 0.516 of 0.5625 B a parameter
    assert 0.5 < out["int8"]["base_bytes"] / out["compute"]["base_bytes"] < 0.53  # a 70B model: the blocks dominate
    assert 0.28 < out["nf4"]["base_bytes"] / out["compute"]["base_bytes"] < 0.31
    assert out["nf4"]["step_s"] <= out["int8"]["step_s"]
    assert out["int8"]["ssd_bytes"] < 0.6 * out["compute"]["ssd_bytes"]
    assert out["int8"]["step_s"] < out["compute"]["step_s"]  # streamed from one SSD: fewer bytes, a shorter step


def test_dequantise_rows_refuses_what_it_cannot_write():
    codes, scale = torch.zeros(4, 8, dtype=torch.int8), torch.ones(4)
    for bad in (torch.empty(4, 8), torch.empty(4, 7, dtype=torch.bfloat16), torch.empty(32, dtype=torch.bfloat16)):
        with pytest.raises(ValueError, match="dequantise_rows"):
            dequantise_rows(codes, scale, torch.bfloat16, bad)
    with pytest.raises(ValueError, match="dequantise_rows"):
        dequantise_rows(codes, torch.ones(5), torch.float32)


def test_the_cost_model_counts_the_packed_base():
    from fuyou.models.config import preset
    from fuyou.models.lora import LoRAConfig
    from fuyou.planner.cost import Workload, step_bytes

    w = {b: Workload(ModelConfig(**preset("llama-7b")), 1, 512, lora=LoRAConfig(rank=16, base=b)) for b in ("compute", "int8")}
    b = {k: step_bytes(v, set()) for k, v in w.items()}
    for k in ("ssd_read", "h2d"):
        assert 0.5 < b["int8"][k] / b["compute"][k] < 0.53, k


def test_double_quantised_absmax_is_close_and_deterministic():
    """QLoRA's double quantisation: the absmax read back is within half a code step of the true one
    (a 0.2 % bound here), the blob is 4 + 4 x groups + one byte per block, a zero block stays zero,
    and dequantising twice gives the same bits."""
    from fuyou.models.quant import NF4DQ_GROUP, double_dequantise, double_quantise

    torch.manual_seed(1)
    w = torch.randn(700, 301) * 0.02
    w[3] = 0.0  # whole blocks of zeros
    codes, absmax = quantise_nf4(w)
    blob = double_quantise(absmax)
    nb = absmax.numel()
    assert blob.dtype == torch.uint8 and blob.numel() == 4 + 4 * -(-nb // NF4DQ_GROUP) + nb
    back = double_dequantise(blob, nb)
    step = (absmax - absmax.mean()).abs().max() / 127
    assert float((back - absmax).abs().max()) <= 0.5 * float(step) * (1 + 1e-5)
    assert torch.equal(back, double_dequantise(blob.clone(), nb))
    from fuyou.models.quant import FORMATS

    x = FORMATS["nf4dq"].dequantise(codes, blob, tuple(w.shape), torch.float32)
    assert float(x[3].abs().max()) == 0.0
    plain = dequantise_nf4(codes, absmax, w.numel(), torch.float32).view_as(w)
    assert float((x - plain).norm() / (plain - w).norm()) < 0.05  # far below NF4's own error


def test_nf4_values_halfway_between_two_levels_take_the_lower_one():
    """A value exactly halfway between two NF4 levels goes to the lower (bitsandbytes compares x > midpoint),
    in the torch path and the kernel's alike: random weights never land on a midpoint, and ties sent up passed
    every test (a mutation audit)."""
    levels = torch.tensor(NF4_LEVELS, dtype=torch.float32)
    mids = (levels[1:] + levels[:-1]) / 2
    w = torch.cat([torch.tensor([1.0]), mids, torch.zeros(64 - 1 - mids.numel())])  # absmax 1: x / absmax exact
    for kernel in (False, True):
        codes, am = quantise_nf4(w, kernel=kernel)
        idx = torch.stack([codes & 15, codes >> 4], dim=1).reshape(-1)
        assert float(am[0]) == 1.0
        assert idx[1:1 + mids.numel()].tolist() == list(range(mids.numel())), kernel  # level i, not i + 1
