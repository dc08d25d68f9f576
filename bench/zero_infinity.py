"""The ZeRO-Infinity peer: train a fuyou model preset with DeepSpeed ZeRO-3, parameters and optimizer
state offloaded to NVMe, bf16 (or fp32 with ``--precision fp32``), one process on whatever accelerator DeepSpeed
finds (CPU here).

Same model, same initial weights, same batches as fuyou: the ``nn.Module`` below is a thin wrapper
around ``fuyou.models.StageModel`` (one submodule per stage, one ``nn.Parameter`` per owned parameter,
initialised from ``StageModel.init_params(seed)``; its forward binds them and calls the stages'
stateless ``forward``), and batch ``i`` is ``fuyou.data`` batch ``i``. Step 0's loss therefore equals
``StageModel.forward_loss`` on the same batch within bf16 rounding (fp32's under ``--precision fp32``;
tests/bench/test_zero_infinity_smoke.py).

Under torchrun (``WORLD_SIZE`` > 1) it is ZeRO-Infinity data parallel: ``--grad-accum`` stays the global
batch's micro-batches, each rank runs its contiguous share of them (as fuyou's ranks do), and rank 0
writes ``--json`` with its own I/O and memory (``bench/dp_bench.py --peer``).

    # once: tools/setup_deepspeed_peer.sh (venv /tmp/dsvenv with deepspeed 0.19.8)
    flock /tmp/fuyou-bench.lock /tmp/dsvenv/bin/python bench/zero_infinity.py --model gpt3-125m \\
        --batch 4 --seq 512 --steps 5 --warmup 1 --nvme-dir /tmp/zinf --json zinf.json

Settings given to ZeRO-Infinity (chosen so the peer is not crippled; each is printed and saved):

* ``stage3_param_persistence_threshold`` 1e5 (DeepSpeed's default): biases and norm weights stay
  resident instead of making a 4 KiB NVMe round trip each; only matrices and embeddings are swapped.
* ``offload_param.buffer_size`` = the largest swapped parameter (every in-flight parameter takes one
  whole buffer, whatever its size), ``buffer_count`` = the tensors of ``--prefetch-blocks`` + 2 blocks
  plus the embedding/head ones. The default of 5 buffers dies with "Not enough buffers 0 for swapping 1".
* ``stage3_prefetch_bucket_size`` = ``--prefetch-blocks`` (default 2) blocks' parameters: reads of the
  next blocks overlap compute of this one; more only costs pinned memory.
* ``sub_group_size`` = the buffer size, so the optimizer step is split into several sub-groups and
  ``pipeline_read``/``pipeline_write`` can overlap the NVMe traffic of one sub-group with CPU Adam of
  another; the optimizer swapper then needs ``buffer_count`` 12 (3 tensors x read/compute/write + grads).
* ``aio``: 1 MiB blocks, ``queue_depth`` 32, ``intra_op_parallelism`` 2 (one per core),
  ``single_submit`` off, ``overlap_events`` on: the fastest in a sweep of ``aio_handle`` settings on the
  development machine (``thread_count`` is ignored by
  current DeepSpeed; ``intra_op_parallelism`` is the thread knob).
* Activation checkpointing per transformer block (``--checkpoint block``, the default), as
  ZeRO-Infinity is run in its paper and as any model larger than toy needs on a GPU; ``--checkpoint none``
  keeps every activation (faster on the CPU, where memory is plentiful at small batch).
* DeepSpeed's CPU Adam (``DeepSpeedCPUAdam``, AdamW mode) is picked automatically with offload;
  gradient clipping off (``gradient_clipping`` 0) unless ``--grad-clip`` is given; constant learning
  rate (fuyou's warm-up schedule does not change a step's cost).

Per-step times, losses, tokens/s (median after ``--warmup`` steps), model TFLOPS
(``StageModel.flops_per_token``), peak RSS (VmHWM) and the bytes the process wrote and read during the
timed steps (``/proc/self/io`` write_bytes/read_bytes, which count O_DIRECT and libaio I/O of every
thread) are printed and written to ``--json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import socket
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from fuyou.data import BatchSampler, DataConfig, SyntheticBatches, load_data
from fuyou.engine.malloc import resident_bytes
from fuyou.models import ModelConfig, StageModel, preset
from fuyou.optim.config import AdamWConfig
from fuyou.units import format_size, parse_size


# -- the model: fuyou's stages as nn.Modules -------------------------------------------------------
class StageModule(nn.Module):
    """One fuyou stage with its owned parameters registered (``.`` in names becomes ``__``)."""

    def __init__(self, stage, init: dict[str, torch.Tensor]):
        super().__init__()
        self.stage = stage
        for local in stage.params:
            self.register_parameter(local.replace(".", "__"), nn.Parameter(init[stage.key(local)].clone()))
        self.external: dict[str, nn.Parameter] = {}  # local name -> parameter owned by another stage

    def bound(self) -> dict[str, torch.Tensor]:
        params = {local: getattr(self, local.replace(".", "__")) for local in self.stage.params}
        params.update(self.external)
        return params

    def forward(self, x, targets=None):
        return self.stage.forward(self.bound(), x, targets)


class FuyouAsModule(nn.Module):
    """``StageModel`` as one ``nn.Module``: ``forward(tokens, targets)`` returns the mean loss."""

    def __init__(self, model: StageModel, init: dict[str, torch.Tensor], checkpoint: str = "none"):
        super().__init__()
        self.model, self.checkpoint = model, checkpoint
        self.stages = nn.ModuleList(StageModule(s, init) for s in model.stages)

    def tie(self, register_external) -> None:
        """Resolve shared parameters (the tied LM head); ``register_external(module, param)`` tells
        ZeRO-3 to gather a parameter when a module that does not own it runs."""
        by_key = dict(self.named_fuyou_parameters())
        for mod in self.stages:
            for local, gkey in mod.stage.shared.items():
                mod.external[local] = by_key[gkey]
                if register_external is not None:
                    register_external(mod, by_key[gkey])

    def named_fuyou_parameters(self):
        for mod in self.stages:
            for local in mod.stage.params:
                yield mod.stage.key(local), getattr(mod, local.replace(".", "__"))

    def forward(self, tokens, targets):
        x = tokens
        for mod in self.stages[:-1]:
            if self.checkpoint == "block" and mod.stage.name.startswith("block."):
                x = torch.utils.checkpoint.checkpoint(mod, x, use_reentrant=False)
            else:
                x = mod(x)
        return self.stages[-1](x, targets)


# -- DeepSpeed configuration -----------------------------------------------------------------------
def ds_config(model: StageModel, args: argparse.Namespace, opt: AdamWConfig) -> dict:
    specs = model.param_specs()
    largest = max(s.numel for s in specs.values())
    block = model.stages[1]
    block_tensors = sum(1 for s in block.params.values() if s.numel > args.persistence_threshold)
    block_numel = sum(s.numel for s in block.params.values())
    edge_tensors = sum(1 for st in (model.stages[0], model.stages[-1])
                       for s in st.params.values() if s.numel > args.persistence_threshold)
    mib = 1 << 20
    buffer_size = -(-largest // mib) * mib  # elements; a multiple of the aio alignment
    param_buffers = args.param_buffers or max(16, (args.prefetch_blocks + 2) * block_tensors + 2 * edge_tensors + 4)
    offload = {"device": args.offload, "pin_memory": True}
    if args.offload == "nvme":
        offload["nvme_path"] = str(args.nvme_dir)
    return {
        "train_micro_batch_size_per_gpu": args.batch,
        "gradient_accumulation_steps": args.grad_accum // world_size(),  # each rank's share of the global batch
        "gradient_clipping": args.grad_clip,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "bf16": {"enabled": args.precision == "bf16"},  # fp32: no mixed precision, fp32 parameters on the NVMe
        "optimizer": {"type": "AdamW", "params": {"lr": opt.lr, "betas": [opt.beta1, opt.beta2], "eps": opt.eps,
                                                  "weight_decay": opt.weight_decay}},
        "zero_optimization": {
            "stage": 3,
            "offload_param": {**offload, "buffer_count": param_buffers, "buffer_size": buffer_size},
            "offload_optimizer": {**offload, "buffer_count": args.opt_buffers,
                                  "pipeline_read": args.pipeline, "pipeline_write": args.pipeline},
            "sub_group_size": buffer_size,
            "stage3_param_persistence_threshold": args.persistence_threshold,
            "stage3_prefetch_bucket_size": max(1, args.prefetch_blocks * block_numel),
            "stage3_max_live_parameters": int(1e9),
            "stage3_max_reuse_distance": int(1e9),
            "contiguous_gradients": True,
            "overlap_comm": True,
        },
        "aio": {"block_size": args.aio_block_size, "queue_depth": args.aio_queue_depth,
                "intra_op_parallelism": args.aio_intra_op, "single_submit": False, "overlap_events": True},
    }


# -- measurement helpers ---------------------------------------------------------------------------
def proc_io() -> dict[str, int]:
    out = {}
    with open("/proc/self/io") as f:
        for line in f:
            k, v = line.split(":")
            out[k.strip()] = int(v)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def world_size() -> int:
    """Ranks under torchrun (data parallel: ``--grad-accum`` is the global batch's micro-batches, split
    among them as fuyou splits them); 1 alone."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def batches(args: argparse.Namespace, vocab: int):
    if args.data == "synthetic":
        return SyntheticBatches(vocab, args.seq, args.batch, args.seed)
    data = load_data(DataConfig(source="builtin", seq_len=args.seq))
    data.check_fits(args.seq, vocab)
    return BatchSampler(data.train, args.seq, args.batch, args.seed)


def reference_loss(model: StageModel, init: dict, x, y, precision: str = "bf16") -> float:
    """fuyou's reference loss of ``init`` on one batch (fp32 weights, under bf16 autocast for ``precision``
    bf16, as the reference trainer)."""
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        return float(model.forward_loss(init, x, y))


def run(args: argparse.Namespace) -> dict:
    for k, v in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(free_port())), ("RANK", "0"),
                 ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        os.environ.setdefault(k, v)
    import deepspeed
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    from deepspeed.accelerator import get_accelerator

    # The accelerator's backend: NCCL on a GPU (gloo has no collectives on CUDA tensors that ZeRO-3
    # needs); on the CPU accelerator gloo (ccl only where oneCCL's bindings are installed).
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())
    torch.manual_seed(args.seed)

    fields = preset(args.model)
    for item in args.model_set:  # KEY=VALUE on the preset's fields (model.n_layer=8 style, without "model.")
        key, _, value = item.partition("=")
        fields[key.removeprefix("model.")] = type(fields[key.removeprefix("model.")])(value) if fields.get(
            key.removeprefix("model.")) is not None else int(value)
    cfg = ModelConfig(**fields)
    if cfg.family == "gpt" and args.seq > cfg.max_seq_len:
        raise SystemExit(f"--seq {args.seq} exceeds {args.model}'s max_seq_len {cfg.max_seq_len}")
    model = StageModel(cfg)
    opt = AdamWConfig(**({"lr": args.lr} if args.lr is not None else {}))
    if args.offload == "nvme":
        args.nvme_dir.mkdir(parents=True, exist_ok=True)
    config = ds_config(model, args, opt)
    data = batches(args, cfg.vocab_size)
    x0, y0, _ = data.batch(0)

    t_init = time.perf_counter()
    init = model.init_params(args.seed)  # outside zero.Init: fp32 values exactly as fuyou draws them
    ref0 = reference_loss(model, init, x0, y0, args.precision) if args.reference_loss else None
    with deepspeed.zero.Init(config_dict_or_path=config):
        net = FuyouAsModule(model, init, args.checkpoint)
    net.tie(deepspeed.zero.register_external_parameter)
    del init
    specs = model.param_specs()
    named = list(net.named_fuyou_parameters())
    groups = [{"params": [p for k, p in named if specs[k].decay], "weight_decay": opt.weight_decay},
              {"params": [p for k, p in named if not specs[k].decay], "weight_decay": 0.0}]
    engine, optimizer, _, _ = deepspeed.initialize(model=net, model_parameters=groups, config=config)
    t_init = time.perf_counter() - t_init
    print(f"initialised in {t_init:.1f}s; optimizer {type(optimizer).__name__}/"
          f"{type(getattr(optimizer, 'optimizer', optimizer)).__name__}", flush=True)

    tokens_per_step = args.batch * args.seq * args.grad_accum  # the global batch's
    world, rank = world_size(), int(os.environ.get("RANK", "0"))
    if args.grad_accum % world:
        raise SystemExit(f"--grad-accum {args.grad_accum} does not divide among {world} ranks")
    per = args.grad_accum // world
    mine = range(rank * per, (rank + 1) * per)
    flops_per_step = model.flops_per_token(args.seq) * tokens_per_step
    times, losses = [], []
    io_start = None
    for step in range(args.steps):
        if step == args.warmup:
            io_start = proc_io()
        t = time.perf_counter()
        lv = 0.0
        for j in mine:  # fuyou's order of micro-batches: batch(step * N + j), this rank's contiguous share
            x, y = (b.to(engine.device) for b in data.batch(step * args.grad_accum + j)[:2])  # the accelerator's device
            loss = engine(x, y)
            engine.backward(loss)  # DeepSpeed scales it by 1/N (fuyou divides each micro-batch's loss by N)
            engine.step()          # an update only at the accumulation boundary
            lv += float(loss.detach()) / len(mine)  # a sync point (nothing is asynchronous on the CPU); this rank's
        dt = time.perf_counter() - t
        times.append(dt)
        losses.append(lv)
        print(f"step {step:3d}  loss {lv:.4f}  {dt:7.2f} s  {tokens_per_step / dt:8.1f} tok/s", flush=True)
    io_end = proc_io()
    timed = times[args.warmup:] or times
    med = statistics.median(timed)
    written = io_end["write_bytes"] - io_start["write_bytes"] if io_start else None
    read = io_end["read_bytes"] - io_start["read_bytes"] if io_start else None
    n_timed = len(times) - args.warmup
    return {
        "peer": "deepspeed-zero-infinity", "world_size": world, "rank": rank,
        "model": args.model, "num_params": model.num_params, "batch": args.batch, "seq": args.seq,
        "steps": args.steps, "warmup": args.warmup, "data": args.data, "seed": args.seed, "precision": args.precision,
        "step_times_s": times, "losses": losses, "reference_loss_step0": ref0,
        "median_step_s": med, "tokens_per_s": tokens_per_step / med,
        "model_tflops": flops_per_step / med / 1e12, "flops_per_token": model.flops_per_token(args.seq),
        "init_s": t_init, "peak_rss_bytes": resident_bytes("VmHWM"),
        "peak_gpu_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None, "cpu_mem_note": args.cpu_mem_note,
        "io_timed_steps": n_timed, "write_bytes_timed": written, "read_bytes_timed": read,
        "write_bytes_per_step": written / n_timed if written is not None and n_timed else None,
        "read_bytes_per_step": read / n_timed if read is not None and n_timed else None,
        "nvme_dir": str(args.nvme_dir) if args.offload == "nvme" else None,
        "settings": {"checkpoint": args.checkpoint, "prefetch_blocks": args.prefetch_blocks,
                     "deepspeed_config": config},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "deepspeed": deepspeed.__version__, "accelerator": _accelerator_name()},
        "machine": {"host": platform.node(), "cpus": os.cpu_count(), "kernel": platform.release(),
                    "torch_threads": torch.get_num_threads()},
    }


def _accelerator_name() -> str:
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt-test", help="fuyou model preset (default %(default)s)")
    p.add_argument("--model-set", action="append", default=[], metavar="KEY=VALUE",
                   help="a field of the preset, e.g. n_layer=8 (as fuyou's model.n_layer=8)")
    p.add_argument("--batch", type=int, default=4, help="micro-batch size (default %(default)s)")
    p.add_argument("--seq", type=int, default=64, help="sequence length (default %(default)s)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default %(default)s)")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps, warm-up included (default %(default)s)")
    p.add_argument("--warmup", type=int, default=1, help="steps left out of the medians and I/O counts")
    p.add_argument("--data", choices=("synthetic", "builtin"), default="synthetic",
                   help="fuyou's SyntheticBatches or the builtin corpus with BatchSampler")
    p.add_argument("--seed", type=int, default=1234, help="weight-init and data seed (fuyou's default 1234)")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16",
                   help="bf16 mixed precision (DeepSpeed's bf16 section), or fp32 throughout (default %(default)s)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: AdamWConfig's)")
    p.add_argument("--grad-clip", type=float, default=0.0, help="global-norm clipping; 0 = off (default)")
    p.add_argument("--offload", choices=("nvme", "cpu"), default="nvme",
                   help="where params and optimizer state live")
    p.add_argument("--nvme-dir", type=Path, default=Path("/tmp/fuyou-zinf"),
                   help="swap directory (default %(default)s)")
    p.add_argument("--cpu-mem-note", default=None,
                   help="the CPU budget fuyou is given in the same comparison (recorded only: DeepSpeed "
                        "has no such limit)")
    p.add_argument("--checkpoint", choices=("block", "none"), default="block", help="activation checkpointing")
    p.add_argument("--prefetch-blocks", type=int, default=2, help="blocks of parameters prefetched ahead")
    p.add_argument("--param-buffers", type=int, default=0, help="offload_param.buffer_count (0 = computed)")
    p.add_argument("--opt-buffers", type=int, default=12, help="offload_optimizer.buffer_count")
    p.add_argument("--pipeline", action=argparse.BooleanOptionalAction, default=True,
                   help="offload_optimizer pipeline_read/pipeline_write")
    p.add_argument("--persistence-threshold", type=int, default=100_000,
                   help="stage3_param_persistence_threshold: smaller parameters stay resident")
    p.add_argument("--aio-block-size", type=parse_size, default=1 << 20)
    p.add_argument("--aio-queue-depth", type=int, default=32)
    p.add_argument("--aio-intra-op", type=int, default=2, help="aio intra_op_parallelism (I/O threads)")
    p.add_argument("--no-reference-loss", dest="reference_loss", action="store_false",
                   help="skip computing fuyou's reference loss of batch 0 (costs one forward)")
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args(argv)
    if not 0 <= args.warmup < args.steps:
        p.error("--warmup must be smaller than --steps")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import require_deepspeed

    require_deepspeed("bench/zero_infinity.py (DeepSpeed ZeRO-Infinity)")
    res = run(args)
    res["command"] = "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    print(f"{res['model']} ({res['num_params'] / 1e6:.1f}M params) batch {res['batch']} seq {res['seq']}: "
          f"median step {res['median_step_s']:.2f} s, {res['tokens_per_s']:.1f} tokens/s, "
          f"{res['model_tflops'] * 1e3:.2f} GFLOPS model, peak RSS {format_size(res['peak_rss_bytes'])}, "
          f"written {format_size(int(res['write_bytes_per_step'] or 0))}/step, "
          f"read {format_size(int(res['read_bytes_per_step'] or 0))}/step", flush=True)
    if res["reference_loss_step0"] is not None:
        print(f"step-0 loss {res['losses'][0]:.4f} vs fuyou reference {res['reference_loss_step0']:.4f}")
    if args.json and res["rank"] == 0:  # data parallel: rank 0's figures (its I/O, its memory)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
