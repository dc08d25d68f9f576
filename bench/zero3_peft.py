"""The LoRA peer: a Hugging Face model with PEFT LoRA adapters under DeepSpeed ZeRO-3, the base's
parameters offloaded to NVMe, bf16, one process (CPU here): the setup a user without fuyou reaches for
to put LoRA on a model larger than memory (transformers' ``HfDeepSpeedConfig`` so ``from_pretrained``
builds the model already partitioned and offloaded, then ``peft.get_peft_model``, then
``deepspeed.initialize``).

    /tmp/dsvenv/bin/python bench/zero3_peft.py --model-dir DIR --batch 4 --seq 512 --steps 4 --warmup 1 \\
        --rank 16 --alpha 32 --targets q_proj,v_proj --nvme-dir /tmp/z3p --json out.json

Settings: ``offload_param`` to NVMe with buffers sized like ``bench/zero_infinity.py``'s (the largest
parameter; enough buffers for two blocks ahead), the adapters' optimizer (DeepSpeed's CPU Adam through
``offload_optimizer`` device cpu: they are small), ``stage3_param_persistence_threshold`` 1e5, aio as in
``zero_infinity.py``, activation checkpointing per decoder layer (transformers'
``gradient_checkpointing_enable``, non-reentrant, as PEFT recommends). Batches: fuyou's
``SyntheticBatches`` (seed, index), the same tokens fuyou trains on. Reports step times, losses, peak RSS
(VmHWM) and /proc/self/io bytes per timed step as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def proc_io() -> dict[str, int]:
    out = {}
    with open("/proc/self/io") as f:
        for line in f:
            k, v = line.split(":")
            out[k.strip()] = int(v)
    return out


def vmhwm() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", required=True)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=4, help="steps in all, warm-up included")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32)
    p.add_argument("--targets", default="q_proj,v_proj")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--nvme-dir", required=True)
    p.add_argument("--buffers", type=int, default=40, help="offload_param.buffer_count")
    p.add_argument("--json", required=True)
    p.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=True,
                   help="activation checkpointing per decoder layer (default on, as PEFT recommends)")
    args = p.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import require_deepspeed

    require_deepspeed("bench/zero3_peft.py (DeepSpeed ZeRO-3 + PEFT)")

    for k, v in (("MASTER_ADDR", "127.0.0.1"), ("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        os.environ.setdefault(k, v)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        os.environ.setdefault("MASTER_PORT", str(s.getsockname()[1]))
    import deepspeed
    from deepspeed.utils import logger as ds_logger
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    from fuyou.data import SyntheticBatches

    ds_logger.setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    hf_cfg = AutoConfig.from_pretrained(args.model_dir)
    d, ff = hf_cfg.hidden_size, hf_cfg.intermediate_size
    largest = max(hf_cfg.vocab_size * d, d * ff)
    kv = hf_cfg.num_key_value_heads * (d // hf_cfg.num_attention_heads)
    block = 2 * d * d + 2 * d * kv + 3 * d * ff
    mib = 1 << 20
    buffer_size = -(-largest // mib) * mib
    nvme = Path(args.nvme_dir)
    nvme.mkdir(parents=True, exist_ok=True)
    ds_cfg = {
        "train_micro_batch_size_per_gpu": args.batch, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
        "steps_per_print": 10**9, "bf16": {"enabled": True},
        "optimizer": {"type": "AdamW", "params": {"lr": args.lr, "betas": [0.9, 0.999], "eps": 1e-8,
                                                  "weight_decay": 0.0}},
        "zero_optimization": {
            "stage": 3,
            # every in-flight parameter takes a whole buffer of the largest one's size: enough for the
            # blocks live at once (bounded by max_live: three blocks) and the embedding and head
            "offload_param": {"device": "nvme", "nvme_path": str(nvme), "pin_memory": True,
                              "buffer_count": args.buffers, "buffer_size": buffer_size},
            "offload_optimizer": {"device": "cpu", "pin_memory": True},
            "stage3_param_persistence_threshold": 100000,
            "stage3_prefetch_bucket_size": 2 * block,
            "stage3_max_live_parameters": 3 * block, "stage3_max_reuse_distance": 3 * block,
            "contiguous_gradients": True, "overlap_comm": True,
        },
        "aio": {"block_size": 1 << 20, "queue_depth": 32, "intra_op_parallelism": 2, "single_submit": False,
                "overlap_events": True},
    }
    keep = HfDeepSpeedConfig(ds_cfg)  # noqa: F841 -- alive while from_pretrained runs: zero.Init partitions
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.bfloat16)
    if args.checkpointing:  # (--no-checkpointing: every layer's activations kept, no recomputation)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0,
                                             target_modules=args.targets.split(","), task_type="CAUSAL_LM"))
    engine, *_ = deepspeed.initialize(model=model, model_parameters=[q for q in model.parameters() if q.requires_grad],
                                      config=ds_cfg)
    init_s = time.perf_counter() - t0
    data = SyntheticBatches(hf_cfg.vocab_size, args.seq, args.batch, args.seed)
    times, losses, io0 = [], [], None
    for step in range(args.steps):
        if step == args.warmup:
            io0 = proc_io()
        x, y = (b.to(engine.device) for b in data.batch(step)[:2])  # DeepSpeed's forward does not move inputs
        t0 = time.perf_counter()
        logits = engine(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        engine.backward(loss)
        engine.step()
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
        print(f"step {step} loss {losses[-1]:.4f} {times[-1]:.2f} s", file=sys.stderr, flush=True)
    io1 = proc_io()
    n = max(1, args.steps - args.warmup)
    trainable = sum(getattr(q, "ds_numel", q.numel()) for q in model.parameters() if q.requires_grad)
    res = {"step_times_s": times, "losses": losses, "peak_rss_bytes": vmhwm(), "init_s": init_s,
           "write_bytes_per_step": (io1["write_bytes"] - io0["write_bytes"]) / n,
           "read_bytes_per_step": (io1["read_bytes"] - io0["read_bytes"]) / n,
           "trainable_params": trainable, "deepspeed": deepspeed.__version__}
    Path(args.json).write_text(json.dumps(res))
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
