"""``fuyou train --plan auto``: probe this machine (or load ``hardware.profile``), plan, print the
schedule, and return the config the engine trains with (activation policy and prefetch depth; with
``train.global_batch`` and no split given, the micro-batch size and count the planner chose)."""

from __future__ import annotations

import sys
from pathlib import Path

from fuyou.config import FuyouConfig
from fuyou.errors import BudgetError, ConfigError


def plan_config(cfg: FuyouConfig, run_dir: Path, stream=None) -> FuyouConfig:
    from fuyou.planner.cost import Workload
    from fuyou.planner.hardware import resolve, save_profile
    from fuyou.planner.report import text
    from fuyou.planner.search import search, search_split

    stream = stream or sys.stderr
    off = cfg.offload
    if off.mode != "ssd":
        raise ConfigError("--plan auto plans the three-tier engine; use it with --offload ssd --ssd DIR")
    if off.act_policy != "recompute" and not str(off.act_policy).endswith("act-policy.json"):
        # (a new-user pass: --plan auto --act-policy X trained the planner's policy, in silence; "recompute", the
        # default, is also what every saved config.toml holds)
        raise ConfigError(f"--plan auto chooses the activation policy; offload.act_policy={off.act_policy!r} was "
                          f"given too: give one of them")
    import torch

    device = cfg.train.device if cfg.train.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    hw_cfg = cfg.hardware
    if hw_cfg.profile is None and not (hw_cfg.gpu or hw_cfg.ssd):
        _refuse_before_the_probe(cfg, device)
        # its buffers sized to the budget (it held 3 x 128 MiB of I/O and a 256 MiB AdamW state beside a second
        # interpreter whatever --cpu-mem said: a pass measured 826 MiB for a run of 250 MiB + a 250 MiB budget)
        io_bytes = min(128 * 1024**2, max(16 * 1024**2, off.cpu_mem // 6))
        adam_params = min(1 << 24, max(4 * off.optimizer_chunk, off.cpu_mem // 32))  # (no smaller than the cache)
        print(f"fuyou: probing this machine (SSD {off.ssd_dirs[0]}) in a process of its own, before training (a "
              f"second interpreter and the probe's buffers, sized to --cpu-mem where they can be, beside this "
              f"process); set hardware.profile to reuse a profile", file=stream, flush=True)
        profile, measured = _probe_apart(off.ssd_dirs[0], model=cfg.model, batch=cfg.train.micro_batch_size,
                                         seq=cfg.data.seq_len, io_bytes=io_bytes, repeats=2, adam_params=adam_params,
                                         device=cfg.train.device, optimizer_chunk=off.optimizer_chunk,
                                         optimizer_depth=off.optimizer_depth, precision=cfg.train.precision,
                                         gloo=False,  # one process: nothing between ranks to measure
                                         lora=cfg.lora, space_advice="free space there, or give hardware.profile "
                                         "(a profile `fuyou probe` wrote) or hardware.gpu and hardware.ssd presets")
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / "hardware-profile.json"
        save_profile(profile, path, measured)
        hw_cfg = hw_cfg.model_copy(update={"profile": str(path.resolve())})  # (absolute: a resume from elsewhere)
    hw = resolve(hw_cfg)
    if device in ("cuda", "cpu") and hw.device != device:  # (the fake device models either)
        # (a pass: a GPU machine's profile planned 0.002 s steps for a run on the CPU, 2.1 s each, without a word)
        kind = {"cuda": "GPU", "cpu": "CPU"}
        raise ConfigError(f"the hardware given ({hw.source}) is a {kind[hw.device]} machine's, but this run computes "
                          f"on the {kind[device]}: --plan auto would plan another machine; leave hardware.* unset (it "
                          f"then measures this one) or give this machine's profile (`fuyou probe`)")
    # (--gpu-mem with the compute on the CPU: planned as unlimited, and the engine ignores it too, saying so)
    # the run as it is configured: its optimizer state's format, clipping and store too (a pass: the plan of fp32
    # state and clipping, for a run of int8 moments and grad_clip=none, was refused or overran the budget)
    w = Workload.from_config(cfg)
    split = cfg.train.global_batch if cfg.train._auto_split else None
    plan = search(w, hw, off.cpu_mem) if split is None else search_split(w, hw, off.cpu_mem, split)
    print(text(plan), file=stream, flush=True)
    if not plan.feasible:
        raise BudgetError("the planner found no configuration that fits: " + "; ".join(plan.best.problems))
    policy = plan.best.policy
    train = cfg.train
    if split is not None:  # the planner's split of train.global_batch (its plan says why)
        train = train.model_copy(update={"micro_batch_size": plan.workload.batch, "grad_accum": plan.workload.grad_accum})
    run_dir.mkdir(parents=True, exist_ok=True)
    pfile = run_dir / "act-policy.json"
    pfile.write_text(policy.to_json())
    return cfg.model_copy(update={
        "hardware": hw_cfg, "train": train,
        "offload": off.model_copy(update={"act_policy": str(pfile.resolve()), "prefetch_depth": policy.prefetch_depth,
                                          **{k: getattr(policy, k) for k in ("resident_mem", "act_cpu_mem")
                                             if getattr(policy, k) is not None}}),
    })


def _refuse_before_the_probe(cfg: FuyouConfig, device: str) -> None:
    """A CPU budget that even the leanest plan overflows is refused before the machine is probed: the probe took
    seconds and its own process's memory (a second interpreter, its buffers) beside a run that was then refused
    (a pass). The leanest plans are the planner's (``search._fixes``: every activation recomputed, checkpoints on
    the SSD or the device, the least prefetch depth) on this run's device, with GPU memory left unbounded and
    speeds that do not enter memory: a lower bound of what the search will need, so never a stricter refusal.
    ``device``: the run's ("auto" resolved)."""
    from fuyou.models.precision import auto_fp32_clause
    from fuyou.planner.cost import Workload, stage_costs
    from fuyou.planner.hardware import HardwareProfile
    from fuyou.planner.search import leanest, memory_plan
    from fuyou.units import format_size

    if device not in ("cuda", "cpu") or cfg.train._auto_split:  # (a split of train.global_batch is the search's:
        return  # its micro-batch may be smaller than the one the config holds, and need less: a review)
    hw = HardwareProfile(source="the budget's check before the probe", device=device, fwd_flops=1e12,
                         bwd_flops=1e12, matmul_flops=1e12, gpu_mem=1 << 60, h2d=1e10, d2h=1e10, ssd_read=1e9,
                         ssd_write=1e9, ssd_capacity=1 << 60, cpu_adam=1e9)
    w = Workload.from_config(cfg)
    costs, budget = stage_costs(w), cfg.offload.cpu_mem
    least = memory_plan(w, hw, costs, leanest(w, hw, costs, budget), budget)[0].cpu_minimum
    if least > budget:
        raise BudgetError(f"the CPU memory budget {format_size(budget)} cannot hold even the leanest plan of this "
                          f"run (every activation recomputed): it needs at least {format_size(least, up=True)}; raise "
                          f"offload.cpu_mem (--cpu-mem), or lower train.micro_batch_size or data.seq_len"
                          f"{auto_fp32_clause(cfg.train)}. Nothing was probed or written")


def _probe_apart(ssd_dir, **kw):
    """``planner.probe.probe`` in a process of its own (spawned, so no thread or CUDA state is inherited): its
    buffers (the SSD probe's pinned pair, the AdamW probe's 256 MiB) were the run's peak resident memory, over
    --cpu-mem and the fixed overhead, and its leftovers raised that overhead by 80 MiB (a pass). Its error, a
    sentence, is raised here; a stop (Ctrl-C, SIGTERM) ends it too, and it ends when this process dies."""
    import multiprocessing
    import os
    import signal

    from fuyou.errors import FuyouError
    from fuyou.planner.probe import exit_on_signal

    previous = signal.signal(signal.SIGTERM, exit_on_signal)  # (while it measures: the probe is ended too, below)
    ctx = multiprocessing.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_probe_process, args=(send, str(ssd_dir), kw, os.getpid()), daemon=True,
                       name="fuyou-probe")
    try:
        proc.start()
        send.close()
        try:
            ok, value = recv.recv()
        except EOFError:
            proc.join()
            raise FuyouError(f"the probe of this machine ended without a result (its process's exit status "
                             f"{proc.exitcode}); give hardware.profile from `fuyou probe`, or start again") from None
        proc.join(timeout=30)  # it exits once it has sent (terminated then, its handler ran in its exit: a review)
        if not ok:
            raise value
        return value
    finally:
        if proc.is_alive():
            proc.terminate()  # (its SIGTERM removes its stores: ``_probe_process``)
            proc.join(timeout=10)
            if proc.is_alive():  # stuck in a driver call: not waited for longer
                proc.kill()
        proc.join(timeout=10)
        recv.close()
        signal.signal(signal.SIGTERM, previous)


def _probe_process(send, ssd_dir: str, kw: dict, parent: int) -> None:
    """The probe's process: sends (True, (profile, measurements)) or (False, its error). SIGTERM ends it through its
    cleanup (its stores under the SSD directory removed), and it gets one when the run's process dies, however (a
    run killed while probing left it measuring alone); Ctrl-C is the run's, which ends this one."""
    import ctypes
    import os
    import pickle
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG (Linux)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the run died before the line above (its pid given: a review): nothing to measure
        return
    import traceback

    from fuyou.errors import FuyouError
    from fuyou.planner.probe import exit_on_signal, probe

    signal.signal(signal.SIGTERM, exit_on_signal)  # (before it: nothing made that a SIGTERM's default leaves)
    try:
        result = (True, probe(ssd_dir, **kw))
    except Exception as e:  # noqa: BLE001 -- every error is the run's to report
        said = e if isinstance(e, FuyouError) else None  # (its sentence; anything else with its traceback)
        try:
            if said is not None:
                pickle.loads(pickle.dumps(said))  # (one that pickles but does not load back arrived as a TypeError)
        except Exception:  # noqa: BLE001
            said = None
        result = (False, said or FuyouError(f"the probe of this machine failed:\n{traceback.format_exc()}"))
    send.send(result)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # sent: a terminate now ends it, no cleanup is left to run
