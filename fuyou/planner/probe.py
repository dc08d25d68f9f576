"""``fuyou probe``: measure this machine with fuyou's own code and write a hardware profile.

* compute: one transformer block of the model (its real ``Stage.forward``, weights in the compute
  dtype, under autocast) timed forward (no grad) and recompute+backward with the gradients copied
  into one flat buffer, as the engine runs it; and the block's four matmuls alone. On a machine
  without a GPU the CPU is the compute device.
* H2D / D2H (CUDA): copies between a pinned buffer and the GPU.
* SSD: write, read, and both at once (two tensors) through ``fuyou.store.TensorStore`` on ``--ssd``
  (O_DIRECT, checksums as configured, in the optimizer's request pattern: 4 MiB requests, 6 in
  flight): the profile's ``ssd_mixed_factor`` is the mixed time over the sum of the separate times;
  ``ssd_cpu_s_per_gb`` is the process's CPU time per GB over the separate write and read runs (the
  I/O threads' CRC-32, syscalls and the kernel's O_DIRECT work).
* CPU AdamW: ``fuyou.optim.fused_adamw_`` (bf16 gradient, bf16 copy out), parameters per second.
* one out-of-core AdamW job (``OutOfCoreAdamW.update``, state on ``--ssd``) of the model's block
  (at most ``JOB_PARAMS_MAX`` parameters), timed, against the simulator's prediction of that job
  from the figures above: the profile's ``adam_io_efficiency`` is predicted / measured.
* data parallelism's transfers through CPU memory: a gloo broadcast (the weight exchange) and a
  reduce of fp32 (the gradient sums on a CPU device) between two processes of this machine, as the
  ranks under torchrun make them (``probe_gloo``).
* memory: CPU total, GPU total, free space under ``--ssd``.

Each figure is the median of ``repeats`` runs after one warm-up. Defaults take well under a minute.
"""

from __future__ import annotations

import os
import resource
import shutil
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F

from fuyou.errors import ConfigError
from fuyou.models import ModelConfig, StageModel, preset
from fuyou.models.lora import LoRAConfig, attach, init_adapters, resolve_targets
from fuyou.planner.cost import StageCost
from fuyou.planner.hardware import HardwareProfile
from fuyou.planner.simulate import simulate_job
from fuyou.store import PinnedPool, StoreConfig, TensorStore
from fuyou.models.precision import autocast, bf16_native

NOT_USED = 1e15  # bandwidth of a link a CPU-only machine does not have (never the bottleneck)
#: The largest job the probe times (parameters; 12 B each of SSD state, written before): a larger
#: block's job fills and drains the same pipeline over more bytes, so its efficiency is no lower.
JOB_PARAMS_MAX = 32 * 1024**2


def _median_time(fn, repeats: int, sync=lambda: None) -> float:
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


UNSTEADY_RATIO = 4.0  # forward and backward rates further apart than this: measured while the machine was busy
UNSTEADY_TRIES = 3   # measurements of the block before the probe says its rates are not to be trusted

PROBE_LORA = LoRAConfig(rank=16, targets=["all-linear"])  # the adapters timed when the run's are not known


def probe_compute(cfg: ModelConfig, batch: int, seq: int, device: torch.device, repeats: int = 3,
                  dtype: torch.dtype = torch.bfloat16, lora: LoRAConfig | None = None) -> dict:
    """FLOP/s of one block's forward, recompute+backward, and its matmuls, at the model's shapes; and of
    its forward and recompute+backward with LoRA adapters (``lora``, default ``PROBE_LORA``) on a frozen
    base, as the engine runs it: the base's weight gradients gone, thin adapter matmuls, their casts and
    dropout, at other FLOP rates (a LoRA step on this CPU took 1.45x the full fine-tuning rates' prediction)."""
    model = StageModel(cfg)
    block = model.stages[1]
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    params = {k.split(".", 2)[2]: v.to(device, dtype) for k, v in block.init_params(0).items()}
    x = torch.randn(batch, seq, cfg.d_model, device=device)
    prec = "bf16" if dtype == torch.bfloat16 else "fp32"
    N, d, ff = batch * seq, cfg.d_model, cfg.ff_dim
    qw, kv = cfg.q_width, cfg.kv_heads * cfg.head_dim
    mm = {"qkv": 2.0 * N * d * (qw + 2 * kv), "proj": 2.0 * N * qw * d,
          "fc1": 2.0 * N * d * ff * (2 if cfg.family == "llama" else 1), "fc2": 2.0 * N * ff * d}
    fwd_flops = sum(mm.values()) + 4.0 * N * seq * qw

    def fwd():
        with torch.no_grad(), autocast(device, prec):
            block.forward(params, x)

    flat = torch.empty(sum(v.numel() for v in params.values()), device=device, dtype=dtype)

    def bwd():
        # as Engine._step and _accumulate run it: recompute + backward, then the gradients
        # copied into one flat buffer for the optimizer
        leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        inp = x.detach().requires_grad_(True)
        with torch.enable_grad(), autocast(device, prec):
            out = block.forward(leaves, inp)
        grads = torch.autograd.grad(out, [inp, *leaves.values()], torch.ones_like(out))
        torch.cat([g.reshape(-1) for g in grads[1:]], out=flat)

    a = torch.randn(N, d, device=device, dtype=dtype)
    att = torch.randn(N, qw, device=device, dtype=dtype)
    h = torch.randn(N, ff, device=device, dtype=dtype)
    ws = [torch.randn(qw + 2 * kv, d, device=device, dtype=dtype), torch.randn(d, qw, device=device, dtype=dtype),
          torch.randn(ff, d, device=device, dtype=dtype), torch.randn(d, ff, device=device, dtype=dtype)]

    def matmuls():
        F.linear(a, ws[0]), F.linear(att, ws[1]), F.linear(a, ws[2]), F.linear(h, ws[3])

    mm_flops = 2.0 * N * d * (qw + 2 * kv) + 2.0 * N * qw * d + 2.0 * N * d * ff * 2
    # The forward and the recompute + backward run the same matmuls at about one rate. One far from the other (a
    # pass: 33x, the plan's steps 4-6x off) was measured while something else took the cores: measured again
    unsteady = True
    for _ in range(UNSTEADY_TRIES):
        t_f, t_b, t_m = (_median_time(f, repeats, sync) for f in (fwd, bwd, matmuls))
        rf, rb = fwd_flops / t_f, 3 * fwd_flops / t_b
        if max(rf, rb) <= UNSTEADY_RATIO * min(rf, rb):
            unsteady = False
            break
    lora = lora if lora is not None and lora.enabled else PROBE_LORA
    narrowest = min(d, qw, kv, ff)  # (a small block, or the smaller one the probe times on a CPU: attach refuses
    lora = lora.model_copy(update={"rank": min(lora.rank, narrowest)})  # a rank beyond a matmul's side)
    lmodel = StageModel(cfg)
    attach(lmodel, lora)
    lblock = lmodel.stages[1]
    adapters = {k.split(".", 2)[2]: v.to(device) for k, v in init_adapters(lblock, lora, 0).items()}
    key = 1 if lora.dropout > 0 else None

    def lora_fwd():
        with torch.no_grad(), autocast(device, prec):
            lblock.forward({**params, **adapters}, x, key=key)

    def lora_bwd():  # the base frozen: gradients of the input and the adapters only (Engine in LoRA mode)
        trained = {k: v.detach().requires_grad_(True) for k, v in adapters.items()}
        inp = x.detach().requires_grad_(True)
        with torch.enable_grad(), autocast(device, prec):
            out = lblock.forward({**params, **trained}, inp, key=key)
        torch.autograd.grad(out, [inp, *trained.values()], torch.ones_like(out))

    # the FLOPs the planner charges these tasks (cost.StageCost): the adapters' 2 N r (in + out) in forward;
    # recompute, then the base's input gradients (1x) and attention's and the adapters' (2x)
    adapted = StageCost("block", 1, "block", 0, fwd_flops + sum(2.0 * N * p.numel for p in lblock.adapters.values()),
                        mm, {})
    lora_fwd_flops, lora_bwd_flops = adapted.fwd_flops, adapted.backward_flops(set(), frozen=True)
    t_lf, t_lb = (_median_time(f, repeats, sync) for f in (lora_fwd, lora_bwd))

    # the head's forward+backward (the engine's one task): the chunked loss's softmax over the vocabulary
    # is elementwise work the blocks' rates do not carry (a 32k vocabulary's head took 1.46x their prediction)
    head, V = model.stages[-1], cfg.vocab_size
    hp = {"norm.weight": torch.ones(d, device=device, dtype=dtype),
          "lm_head.weight": (torch.randn(V, d, device=device) * 0.02).to(dtype)}
    if cfg.family == "gpt":
        hp["norm.bias"] = torch.zeros(d, device=device, dtype=dtype)
    targets = torch.randint(V, (batch, seq), device=device)

    def head_step(frozen: bool):
        def run():
            ws = {k: v.detach().requires_grad_(not frozen) for k, v in hp.items()}
            inp = x.detach().requires_grad_(True)
            with torch.enable_grad(), autocast(device, prec):
                loss = head.forward(ws, inp, targets, loss_tokens=N)
            torch.autograd.grad(loss, [inp] + ([] if frozen else list(ws.values())))
        return run

    head_cost = StageCost("head", 2, "head", 0, 2.0 * N * d * V, {}, {})
    t_h, t_lh = (_median_time(head_step(frozen), repeats, sync) for frozen in (False, True))
    return {"block_shape": f"{cfg.family} d={d} ff={ff} batch={batch} seq={seq}", "d_model": d, "tokens": N,
            "unsteady": unsteady,
            "fwd_s": t_f, "bwd_s": t_b,
            "fwd_flops": fwd_flops / t_f, "bwd_flops": 3 * fwd_flops / t_b, "matmul_flops": mm_flops / t_m,
            "lora": f"rank {lora.rank} on {', '.join(resolve_targets(cfg.family, lora.targets))}"
                    + (f", dropout {lora.dropout}" if lora.dropout else ""),
            "lora_fwd_s": t_lf, "lora_bwd_s": t_lb,
            "lora_fwd_flops": lora_fwd_flops / t_lf, "lora_bwd_flops": lora_bwd_flops / t_lb,
            "head_s": t_h, "lora_head_s": t_lh, "head_flops": head_cost.backward_flops(set()) / t_h,
            "lora_head_flops": head_cost.backward_flops(set(), frozen=True) / t_lh}


def probe_adam(numel: int, repeats: int = 3) -> float:
    """Parameters per second of fuyou's fused AdamW (bf16 gradient, bf16 copy out)."""
    from fuyou.optim import fused_adamw_

    p, m, v = torch.randn(numel), torch.zeros(numel), torch.zeros(numel)
    g = torch.randn(numel, dtype=torch.bfloat16)
    out = torch.empty(numel, dtype=torch.bfloat16)
    step = [0]

    def run():
        step[0] += 1
        fused_adamw_(p, g, m, v, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, step=step[0],
                     out_lowp=out)

    return numel / _median_time(run, repeats)


def sweep_probe_dirs(directory: Path, quiet_s: float = 120.0) -> list[Path]:
    """Remove the stores a killed probe left under ``directory`` (``fuyou-probe-<pid>``, ``fuyou-probe-job-<pid>``:
    SIGKILL runs no cleanup; a pass found one left at every kill): those whose process is gone, whose store
    lock nobody holds (the flock is seen across containers; a pid may be another container's) and whose files
    have not changed for ``quiet_s`` (a store made but not locked yet)."""
    import re

    from fuyou.store.lock import lock_holder
    from fuyou.store.shared import process_gone

    gone = []
    for p in Path(directory).glob("fuyou-probe-*"):
        m = re.fullmatch(r"fuyou-probe-(?:job-)?(\d+)", p.name)
        if not m or not p.is_dir() or int(m.group(1)) == os.getpid() or not process_gone(int(m.group(1))):
            continue
        if lock_holder(p) is not None:  # (a live probe's read phase writes nothing for minutes: the review)
            continue
        try:
            newest = max([p.stat().st_mtime, *(f.stat().st_mtime for f in p.iterdir())])
        except OSError:
            continue
        if time.time() - newest >= quiet_s:
            shutil.rmtree(p, ignore_errors=True)
            gone.append(p)
    return gone


def exit_on_signal(signum, frame) -> None:
    """A SIGTERM handler while the probe measures: it ends through its cleanup (its stores under the SSD directory
    removed), as Ctrl-C ends it, with exit status 128 + the signal's number."""
    raise SystemExit(128 + signum)


STORE_REQUEST = 4 * 1024**2  # ``probe_store``'s request: its tensors are a whole number of them


def check_probe_space(d: Path, io_bytes: int, job_params: int, advice: str | None = None) -> None:
    """Before any measuring: what the probe writes under ``d`` fits its free space. The SSD probe's two tensors
    of ``io_bytes`` (whole requests, at least one) and then the AdamW job's fp32 master and moments of the model's
    block (it checked 2x --io-bytes: a 9 MiB file system failed in the last phase, after the measuring)."""
    from fuyou.units import format_size

    store = 2 * max(STORE_REQUEST, io_bytes // STORE_REQUEST * STORE_REQUEST)
    job = 12 * job_params
    need, free = max(store, job) + (1 << 20), shutil.disk_usage(d).free  # (+ the stores' manifests and locks)
    if need > free:
        cut = advice or ("give a smaller --io-bytes" if store >= job and io_bytes > STORE_REQUEST else
                         "give a smaller --model (the job is one of its blocks)" if job > store else "free space there")
        raise ConfigError(f"--ssd {d}: the probe writes up to {format_size(need)} there (the SSD probe's two tensors "
                          f"of {format_size(store // 2)}, then the AdamW job's state of the model's block, "
                          f"{format_size(job)}), more than the {format_size(free)} free: {cut}, or measure a "
                          f"directory with more room")


def probe_store(directory: Path, nbytes: int, repeats: int = 3, cfg: StoreConfig | None = None,
                request: int = 4 * 1024**2, inflight: int = 6) -> dict:
    """Write, read and mixed (write one tensor while reading another) bandwidth through the store, in
    the optimizer's pattern: ``request``-byte requests (a 1M-element fp32 chunk), ``inflight`` at once
    (``OutOfCoreAdamW``: depth 2 x master, m, v)."""
    cfg = cfg or StoreConfig()
    sweep_probe_dirs(directory)
    root = directory / f"fuyou-probe-{os.getpid()}"
    shutil.rmtree(root, ignore_errors=True)
    nbytes = max(request, nbytes // request * request)  # (``check_probe_space`` counts the same)
    pool = PinnedPool(2 * nbytes + (1 << 20))

    def stream(op, key, buf):
        futs = []
        for s in range(0, nbytes, request):
            if len(futs) >= inflight:
                futs.pop(0).result()
            futs.append(op(key, buf.tensor[s:s + request], start=s))
        for f in futs:
            f.result()

    try:
        with TensorStore.create([root], cfg) as store, pool.acquire(nbytes) as a, pool.acquire(nbytes) as b, \
                ThreadPoolExecutor(2) as ex:
            a.tensor.copy_(torch.randint(0, 256, (nbytes,), dtype=torch.uint8))
            for k in ("a", "b"):
                store.allocate(k, (nbytes,), torch.uint8)
                store.write_from(k, a.tensor).result()  # untimed: turns the fallocated extents into written ones
            b.tensor.fill_(0)  # untimed: first touch of huge pages costs ~10x a steady read's CPU
            c0 = _cpu_seconds()
            tw = _median_time(lambda: stream(store.write_from, "a", a), repeats)
            tr = _median_time(lambda: stream(store.read_into, "b", b), repeats)
            # The I/O threads' CPU, both ways, over every pass (_median_time runs one more, a warm-up).
            cpu_per_byte = (_cpu_seconds() - c0) / (2 * (repeats + 1) * nbytes)

            def mixed():
                fw = ex.submit(stream, store.write_from, "a", a)
                fr = ex.submit(stream, store.read_into, "b", b)
                fw.result(), fr.result()

            tm = _median_time(mixed, repeats)
    finally:
        pool.close()
        shutil.rmtree(root, ignore_errors=True)
    return {"write": nbytes / tw, "read": nbytes / tr, "mixed_factor": tm / (tw + tr), "bytes": nbytes,
            "request": request, "inflight": inflight, "cpu_s_per_byte": cpu_per_byte}


def probe_adam_job(directory: Path, numel: int, cfg: StoreConfig | None = None, chunk: int = 1 << 20,
                   depth: int = 2, repeats: int = 3) -> dict:
    """Seconds of one ``OutOfCoreAdamW.update`` of ``numel`` parameters whose fp32 master, m and v
    are in a store on ``directory`` (bf16 gradient in CPU memory, bf16 weights out to CPU memory, as
    for a stage whose compute weights are cached): the engine's optimizer job, alone."""
    from fuyou.optim.config import AdamWConfig
    from fuyou.optim.out_of_core import OutOfCoreAdamW, Segment, StateKeys

    cfg = cfg or StoreConfig()  # (what a killed probe left here, probe_store swept: it runs first)
    root = directory / f"fuyou-probe-job-{os.getpid()}"
    shutil.rmtree(root, ignore_errors=True)
    keys = StateKeys("p", "m", "v")
    try:
        with TensorStore.create([root], cfg) as store:
            opt = OutOfCoreAdamW(store, None, AdamWConfig(), chunk_numel=chunk, depth=depth)
            pool = PinnedPool(opt.max_buffer_bytes(2, 2) + (1 << 20))
            opt.pool = pool
            try:
                init = {"p": torch.randn(numel), "m": torch.zeros(numel), "v": torch.full((numel,), 1e-6)}
                for k in keys.state:
                    store.allocate(k, (numel,), torch.float32)
                    store.write_from(k, init[k]).result()
                del init
                grad = torch.randn(numel, dtype=torch.bfloat16)
                out = torch.empty(numel, dtype=torch.bfloat16)
                step = [0]

                def job():
                    step[0] += 1
                    opt.update(keys, grad, numel=numel, segments=[Segment(0, numel, 0.01)], lr=1e-4, step=step[0],
                               lowp_out=out)

                t = _median_time(job, repeats)
            finally:
                pool.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {"params": numel, "s": t, "chunk": opt.chunk, "depth": depth}


def _cpu_seconds() -> float:
    """User + system CPU time of this process (every thread) so far."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def probe_links(nbytes: int, repeats: int = 3) -> dict:
    """Pinned host<->device copy bandwidth (CUDA)."""
    dev = torch.device("cuda")
    host = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    gpu = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    sync = lambda: torch.cuda.synchronize(dev)  # noqa: E731
    th = _median_time(lambda: gpu.copy_(host, non_blocking=True), repeats, sync)
    td = _median_time(lambda: host.copy_(gpu, non_blocking=True), repeats, sync)
    return {"h2d": nbytes / th, "d2h": nbytes / td}


def _gloo_worker(rank: int, store_path: str, nbytes: int, message: int, repeats: int) -> None:
    """One of ``probe_gloo``'s two processes; rank 0 prints the figures as JSON."""
    import json

    import torch.distributed as dist

    torch.set_num_threads(1)  # as torchrun starts each rank
    dist.init_process_group("gloo", store=dist.FileStore(store_path, 2), rank=rank, world_size=2)
    try:
        t = torch.ones(message, dtype=torch.uint8)  # the exchange sends a chunk's bytes at a time
        g = torch.ones(nbytes // 4)                 # a stage's gradient is summed whole
        count = max(1, nbytes // message)
        result = {}
        for name, fn in (("broadcast", lambda: [dist.broadcast(t, 0) for _ in range(count)]),
                         ("reduce", lambda: dist.reduce(g, 0))):
            times = []
            for _ in range(repeats + 1):
                dist.barrier()
                t0 = time.perf_counter()
                fn()
                dist.barrier()
                times.append(time.perf_counter() - t0)
            moved = count * message if name == "broadcast" else nbytes
            result[name] = moved / statistics.median(times[1:])
        if rank == 0:
            print(json.dumps(result), flush=True)
    finally:
        dist.destroy_process_group()


def probe_gloo(nbytes: int = 64 * 1024**2, repeats: int = 3, message: int = 4 * 1024**2,
               timeout: float = 120.0) -> dict:
    """Bytes/s of gloo between two processes of this machine (two fresh interpreters: nothing of the
    caller's script is imported again): ``nbytes`` broadcast in ``message``-byte pieces (the weight
    exchange's chunks: the default optimizer chunk of 1M elements in fp32), and a reduce of ``nbytes``
    of fp32 (a stage's gradient sum on a CPU device)."""
    import json
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        logs = [open(os.path.join(tmp, f"rank{r}.log"), "w+") for r in range(2)]  # files: a pipe could fill and block
        try:
            procs = [subprocess.Popen([sys.executable, "-c", f"from fuyou.planner.probe import _gloo_worker; "
                                       f"_gloo_worker({r}, {store!r}, {nbytes}, {message}, {repeats})"],
                                      stdout=logs[r], stderr=subprocess.STDOUT, text=True) for r in range(2)]
            deadline = time.monotonic() + timeout
            try:
                for p in procs:
                    p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise ConfigError(f"the gloo probe between two processes did not finish within {timeout:.0f} s") from None
            finally:
                for p in procs:
                    if p.poll() is None:
                        p.kill()
                        p.wait()
            outs = []
            for f in logs:
                f.seek(0)
                outs.append(f.read())
        finally:
            for f in logs:
                f.close()
    if any(p.returncode for p in procs):
        err = next(o for o, p in zip(outs, procs) if p.returncode).strip().splitlines()
        raise ConfigError(f"the gloo probe between two processes failed: {err[-1] if err else 'no message'}")
    lines = [x for x in outs[0].splitlines() if x.startswith("{")]  # the figures, among any warnings
    if not lines:
        raise ConfigError(f"the gloo probe between two processes printed no figures: {outs[0].strip()[-300:]}")
    return json.loads(lines[-1])


def cpu_memory() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def probe(ssd_dir: str | Path, *, model: str | ModelConfig | None = None, batch: int | None = None,
          seq: int | None = None, io_bytes: int = 256 * 1024**2, adam_params: int = 1 << 24, repeats: int = 3,
          device: str = "auto", store_cfg: StoreConfig | None = None, optimizer_chunk: int = 1 << 20,
          optimizer_depth: int = 2, precision: str = "auto", gloo: bool = True,
          lora: LoRAConfig | None = None, space_advice: str | None = None) -> tuple[HardwareProfile, dict]:
    """Measure this machine (module docstring); returns the profile and the raw measurements.
    ``precision``: the compute dtype the block is timed in (``train.precision``; auto as train resolves it here);
    ``gloo``: measure the transfers between two processes (data parallelism; else the profile keeps the
    defaults); ``lora``: the adapters to time the LoRA rates with (``probe_compute``)."""
    d = Path(ssd_dir)
    if not d.is_dir():
        raise ConfigError(f"--ssd {d} is not a directory; create it on the SSD you want to measure")
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    cuda = dev.type == "cuda"
    if model is None:
        model = "gpt3-1.3b" if cuda else "gpt3-125m"
    cfg = ModelConfig(**preset(model)) if isinstance(model, str) else model
    batch = batch or (8 if cuda else 4)
    asked = seq
    seq = min(seq or (1024 if cuda else 256), cfg.max_seq_len)
    if asked and seq < asked:  # (clamped in silence: a pass)
        print(f"fuyou probe: note: --seq {asked} is beyond the model's {cfg.max_seq_len} positions; timing {seq}",
              file=sys.stderr)
    job_params = min(JOB_PARAMS_MAX, StageModel(cfg).stages[1].num_params)  # the model's block
    check_probe_space(d, io_bytes, job_params, space_advice)
    if not cuda and 12 * cfg.d_model**2 > 3e8:  # a block too large to time on CPU in seconds: a smaller one
        big = cfg.d_model
        cfg = ModelConfig(**{**preset("gpt3-1.3b"), "family": cfg.family})
        print(f"fuyou probe: note: the model's block (d={big}) is too large to time on the CPU in seconds: timing "
              f"a block of d={cfg.d_model}; a plan of the model extrapolates its rates, and says so", file=sys.stderr)
    native = bf16_native(dev.type)
    if precision == "auto":  # (as train.precision=auto resolves on this device)
        precision = "bf16" if native else "fp32"
    meas: dict = {"device": str(dev), "torch": torch.__version__, "threads": torch.get_num_threads(),
                  "compute": probe_compute(cfg, batch, seq, dev, repeats,
                                           torch.bfloat16 if precision == "bf16" else torch.float32, lora)}
    meas["adam_params_per_s"] = probe_adam(adam_params, repeats)
    meas["store"] = probe_store(d, io_bytes, repeats, store_cfg)
    # a job is tens of milliseconds and its figure scales every optimizer SSD task: more repeats
    meas["adam_job"] = probe_adam_job(d, job_params, store_cfg, optimizer_chunk, optimizer_depth, max(7, repeats))
    if gloo:
        meas["gloo"] = probe_gloo(min(io_bytes, 64 * 1024**2), repeats)
    if cuda:
        meas["links"] = probe_links(min(io_bytes, 1 << 30), repeats)
        gpu_mem = torch.cuda.mem_get_info(dev)[1]
    else:
        meas["links"] = {"h2d": NOT_USED, "d2h": NOT_USED}
        gpu_mem = cpu_memory()
    c, s = meas["compute"], meas["store"]
    if c["unsteady"]:
        print(f"fuyou probe: warning: the block's forward and backward ran at rates {UNSTEADY_RATIO:g}x apart or "
              f"more in {UNSTEADY_TRIES} measurements (forward {c['fwd_flops'] / 1e12:.3g}, backward "
              f"{c['bwd_flops'] / 1e12:.3g} TFLOPS): another process took the machine's cores while it measured, so "
              f"the plan's step times may be far off; probe again on a quiet machine", file=sys.stderr)
    prof = HardwareProfile(
        source=f"fuyou probe on {os.uname().nodename} ({dev}, {c['block_shape']})", device=dev.type,
        fwd_flops=c["fwd_flops"], bwd_flops=c["bwd_flops"], matmul_flops=c["matmul_flops"], gpu_mem=gpu_mem,
        lora_fwd_flops=c["lora_fwd_flops"], lora_bwd_flops=c["lora_bwd_flops"], head_flops=c["head_flops"],
        lora_head_flops=c["lora_head_flops"],
        h2d=meas["links"]["h2d"], d2h=meas["links"]["d2h"], ssd_read=s["read"], ssd_write=s["write"],
        ssd_mixed_factor=s["mixed_factor"], ssd_capacity=shutil.disk_usage(d).free, ssd_drives=1,
        ssd_cpu_s_per_gb=s["cpu_s_per_byte"] * 1e9,
        cpu_adam=meas["adam_params_per_s"], cpu_mem=cpu_memory(), compute_block=[c["d_model"], c["tokens"]],
        compute_precision=precision, bf16_native=native,
        **({"gloo_broadcast": meas["gloo"]["broadcast"], "gloo_reduce": meas["gloo"]["reduce"]} if gloo else {}))
    j = meas["adam_job"]
    j["predicted_s"] = simulate_job(j["params"], prof, j["chunk"], j["depth"])
    prof = prof.model_copy(update={"adam_io_efficiency": j["predicted_s"] / j["s"]})
    return prof, meas
