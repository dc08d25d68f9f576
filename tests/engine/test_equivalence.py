"""The three-tier engine gives the same weights and Adam moments as in-memory training (fp32, CPU).

The arithmetic order matches the reference trainer (same stage functions, gradients accumulated as
autograd accumulates them, fuyou's AdamW kernel bit-exact with torch's fused AdamW), so the check is
``torch.equal``, not a tolerance.
"""

import pytest
import torch

from engine_testutil import assert_same_training, make_cfg, run_both


CASES = {
    "gpt-tied": [],
    "gpt-untied": ["model.tie_embeddings=false"],
    "llama": ["model.preset=llama-test"],
    "llama-tied": ["model.preset=llama-test", "model.tie_embeddings=true"],
    "grad-accum": ["train.grad_accum=3"],
    "exact-clip": ["train.grad_clip=0.5"],
    "exact-clip-accum-llama": ["model.preset=llama-test", "train.grad_clip=0.05", "train.grad_accum=2"],
    "weights-on-ssd": ["offload.cache_weights=false", "offload.prefetch_depth=1"],
    "deep-prefetch": ["offload.prefetch_depth=4", "offload.max_pending_updates=1"],
    # The cases above hold every stage's optimizer state in CPU memory (the tiny model fits the budget);
    # these stream it from the SSD for all stages or all but the embedding.
    "state-on-ssd": ["offload.resident_mem=0"],
    "state-on-ssd-clip": ["offload.resident_mem=0", "train.grad_clip=0.5"],
    "state-and-weights-on-ssd": ["offload.resident_mem=0", "offload.cache_weights=false"],
    "partly-resident": ["offload.resident_mem=300KiB"],
    "partly-resident-llama-clip": ["model.preset=llama-test", "offload.resident_mem=400KiB", "train.grad_clip=0.5"],
    # Resident stages under exact clipping speculate from a spare copy (engine.py, Note: [Spare copies]):
    # never clipping; clipping and redone on every step; 'auto' (speculate, then defer); 4 blocks with
    # micro-batches, the resident state's budget leaving spares for the last stages only; and without spares.
    "spare-never-clips": ["train.grad_clip=100"],
    "spare-redo-every-step": ["train.grad_clip=0.5", "offload.clip_schedule=speculate", "train.steps=4"],
    "spare-llama-4-blocks-some": ["model.preset=llama-test", "model.n_layer=4", "train.grad_clip=0.05",
                                  "offload.clip_schedule=speculate", "train.grad_accum=2",
                                  "offload.resident_mem=4200KiB"],
    "spare-off-clip": ["train.grad_clip=0.5", "offload.resident_spare=false"],
    # widths that are not a multiple of 8: torch's fused AdamW rounds each tensor's last numel % 8 elements
    # otherwise (adamw.cpp, Note: [Bit-exact with torch]; a pass found them an ulp off); resident, and
    # streamed in chunks that cut tensors anywhere
    "odd-widths-llama": ["model.preset=llama-test", "model.d_model=36", "model.n_head=6", "model.n_kv_head=2",
                         "model.d_ff=97", "model.vocab_size=301", "train.grad_clip=0.5"],
    "odd-widths-gpt-state-on-ssd": ["model.d_model=36", "model.n_head=4", "model.vocab_size=323",
                                    "offload.resident_mem=0", "offload.optimizer_chunk=1000"],
    # commit 'none': resident state is written back only when read (state(), optimizer_state(), close)
    "commit-none": ["offload.commit=none"],
    "commit-none-partly-resident-ssd-weights": ["offload.commit=none", "offload.resident_mem=300KiB",
                                                "offload.cache_weights=false"],
}


# Every case on one SSD directory; striping across three directories on the cases that move the most.
MATRIX = [(c, 1) for c in CASES] + [(c, 3) for c in ("gpt-tied", "weights-on-ssd", "exact-clip", "state-on-ssd")]


@pytest.mark.parametrize("case,dirs", MATRIX)
def test_engine_equals_reference_fp32(tmp_path, case, dirs):
    cfg = make_cfg(tmp_path, *CASES[case], dirs=dirs)
    ref, eng, ref_stats, eng_stats = run_both(cfg)
    try:
        resident = eng.plan.resident_stages
        if "resident_mem=0" in " ".join(CASES[case]):
            assert resident == []
        elif "partly-resident" in case:
            assert resident and resident == list(range(len(resident))) and len(resident) < len(eng.states)
        else:
            assert resident == list(range(len(eng.states)))
        spare = eng.plan.spare_stages
        if not eng.clipping or "resident_spare=false" in " ".join(CASES[case]):
            assert spare == []
        elif case == "spare-llama-4-blocks-some":  # the last stages' (their backward comes first)
            assert 0 < len(spare) < len(resident) and spare == resident[len(resident) - len(spare):], (resident, spare)
        elif "partly-resident" not in case and "resident_mem=0" not in " ".join(CASES[case]):
            assert spare == resident
        assert_same_training(ref, eng, ref_stats, eng_stats)
    finally:
        eng.close()


def test_state_is_on_ssd_and_removed_at_close(tmp_path):
    cfg = make_cfg(tmp_path, "offload.cache_weights=false")
    ref, eng, _, _ = run_both(cfg, steps=1)
    store_dir = eng.store_dirs[0]
    files = {p.name for p in store_dir.iterdir()}
    assert any(f.endswith(".dat") for f in files)
    n = sum(s.numel for s in eng.states)
    assert sum(p.stat().st_size for p in store_dir.iterdir() if p.suffix == ".dat") >= 26 * n  # two copies + bf16
    eng.completed = True  # what run_training sets after the last step
    eng.close()
    assert not store_dir.exists()


@pytest.mark.parametrize("lora", [False, True])
def test_bf16_loss_curve_tracks_reference(tmp_path, lora):
    """bf16: the engine keeps bf16 weights (the reference autocasts fp32 weights; with LoRA the base is
    streamed in bf16 and its norms too), so the curves differ by rounding. Stated tolerance over 50 steps:
    every step's loss within 1% of the reference's (LoRA: 2%), and the mean of the last 10 steps within 0.5%
    (measured: 0.09% and 0.002%; LoRA rank 8 on every matmul at lr 1e-2: 0.89% and 0.03%, where a new-user
    pass saw the adapters 2-3% from an fp32 run's and the reference's 0.2-0.9%: the engine's embedding, norms
    and base are bf16 values, the reference's fp32 under autocast)."""
    cfg = make_cfg(tmp_path, "train.precision=bf16", "train.steps=50", "train.warmup_steps=5",
                   "data.seq_len=64", "train.micro_batch_size=8",
                   *(["optim.lr=1e-2", "lora.rank=8", "lora.targets=all-linear"] if lora else ["optim.lr=2e-3"]))
    ref, eng, ref_stats, eng_stats = run_both(cfg)
    eng.close()
    r = torch.tensor([s.loss for s in ref_stats])
    e = torch.tensor([s.loss for s in eng_stats])
    assert r[-5:].mean() < r[:5].mean() - (0.05 if lora else 1.0)  # it really trains (LoRA on a random base: slowly)
    assert float(((e - r).abs() / r).max()) < (0.02 if lora else 0.01), (r, e)
    assert abs(float(e[-10:].mean() / r[-10:].mean()) - 1) < 0.005, (r, e)
