"""The planner knows LoRA: a read-only base (no optimizer state, no SSD writes of weights, no gradients
leaving the GPU), adapters and their AdamW state on the device, and the plan it makes."""

from __future__ import annotations

import pytest

from fuyou.cli import main
from fuyou.models.config import ModelConfig, preset
from fuyou.models.lora import LoRAConfig
from fuyou.planner.cost import Workload, step_bytes
from fuyou.planner.hardware import HardwareConfig, resolve
from fuyou.planner.search import search, state_ssd_bytes


def workload(lora: LoRAConfig | None, model="llama3-70b"):
    return Workload(ModelConfig(**preset(model)), 4, 1024, lora=lora)


def test_lora_traffic_and_footprint():
    full, lora = workload(None), workload(LoRAConfig(rank=16, targets=["all-linear"]))
    b_full, b_lora = step_bytes(full, set()), step_bytes(lora, set())
    assert b_lora["ssd_write"] == 0 and b_lora["d2h"] == 0
    n = sum(full.numels)
    assert b_full["ssd_read"] - b_lora["ssd_read"] == 12 * n  # the weights' loads only, not the 12 B/param of state
    assert lora.lora_params == sum(16 * (a + b) for a, b in [(8192, 8192), (8192, 1024), (8192, 1024), (8192, 8192),
                                                              (8192, 28672), (8192, 28672), (28672, 8192)]) * 80
    plan = search(lora, resolve(HardwareConfig(gpu="rtx4090", ssd="1x990-pro")), 120 * 2**30)
    assert plan.feasible
    assert state_ssd_bytes(lora, plan.best.memory) == {"optimizer state copies": 0, "base weights": 2 * n,
                                                       "saved gradients": 0,
                                                       "adapter commits": 2 * 12 * lora.lora_params}
    assert "LoRA adapters, gradients and AdamW moments" in plan.best.memory.device_items
    assert not any(t.queue == "cpu-adam" for t in plan.best.sim.tasks if t.dur > 0)


def test_fuyou_plan_takes_lora_overrides(capsys):
    args = ["plan", "--model", "llama3.3-70b", "--gpu", "rtx4090", "--ssd", "1x990-pro", "--cpu-mem", "128GiB",
            "--batch", "4", "--seq", "1024", "lora.rank=16", "lora.targets=all-linear"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "LoRA rank 16 on q, k, v, o, gate, up, down" in out and "the base is read-only" in out
    assert "CPU Adam" not in out.split("what if")[1].splitlines()[0]
    # nothing is written a step: the commit line and the wear line say so (they said "one commit 0 s, every
    # 1 steps" and asked for --ssd-tbw, which the drive preset gives)
    assert "no cost beyond the step (a commit writes the adapters and their moments)" in out
    assert main(["plan", "--model", "gpt3-13b", "--gpu", "rtx4090", "--ssd", "1x990-pro", "--cpu-mem", "64GiB",
                 "--batch", "8", "--seq", "1024", "lora.rank=8", "lora.base=nf4"]) == 0
    # its only writes are the commits of the adapters and their moments (fp32, 12 bytes a parameter), every
    # 10min: 114 steps here (the plan said 0 B where the run's summary counted them: a pass)
    wear = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("SSD wear"))
    assert "KiB written per step" in wear and "MB per hour" in wear and "hours of training" in wear, wear
    assert main(args[:-2] + ["lora.rank=-1"]) != 0
    assert "invalid lora override" in capsys.readouterr().err
    assert main(["plan", "--model", "gpt3-1.3b", "--gpu", "rtx4090", "--ssd", "1x990-pro", "--cpu-mem", "64GiB",
                 "lora.rank=8", "lora.targets=q_proj"]) != 0
    assert "c_attn" in capsys.readouterr().err


def test_a_data_parallel_lora_plan_counts_every_ranks_adapter_commits(capsys):
    """A pass: each rank commits its own copy of the adapters and their moments (a 2-rank run's summary counted
    both), and `--gpus 2`'s plan said one rank's bytes."""
    import json

    args = ["plan", "--model", "gpt-tiny", "--gpu", "rtx4090", "--ssd", "1x990-pro", "--cpu-mem", "8GiB", "--batch",
            "4", "--seq", "64", "--grad-accum", "2", "--commit-every", "4", "lora.rank=8", "--json"]
    wear = {}
    for gpus in (1, 2):
        assert main(args + ["--gpus", str(gpus)]) == 0
        wear[gpus] = json.loads(capsys.readouterr().out)["ssd_write_per_step_bytes"]
    assert wear[1] > 0 and wear[2] == pytest.approx(2 * wear[1])


def test_a_lora_plans_footprint_holds_the_disk_its_run_uses(tmp_path, capsys):
    """A pass: the adapters' commit file (12 B an adapter parameter; two while a commit replaces the last) was not
    in the footprint: du was 3.6 MB (+9 %, +21 % over an NF4 base) over the plan."""
    import json

    (tmp_path / "ssd").mkdir()
    for base in ("compute", "nf4"):
        assert main(["train", "--offload", "ssd", "--ssd", str(tmp_path / "ssd"), "--cpu-mem", "512MiB", "--out",
                     str(tmp_path / "runs"), f"run.name={base}", "model.preset=llama-test", "data.seq_len=64",
                     "train.micro_batch_size=2", "train.steps=2", "train.eval_every=0", "lora.rank=8",
                     "lora.targets=all-linear", f"lora.base={base}", "offload.keep_state=true",
                     "offload.commit_every=1"]) == 0
        capsys.readouterr()
        assert main(["plan", "--model", str(tmp_path / "runs" / base), "--gpu-tflops", "1", "--ssd", "1x990-pro",
                     "--json"]) == 0
        planned = json.loads(capsys.readouterr().out)
        used = sum(f.stat().st_size for f in (tmp_path / "ssd").glob(f"{base}.fuyou-state*/**/*") if f.is_file())
        parts = planned["ssd_parts_bytes"]
        one = parts["adapter commits"] // 2  # (between commits one file is there: the plan counts the peak's two)
        body = planned["ssd_bytes"] - parts["store margin"]  # (the margin: padding and manifests, at most)
        assert body - one <= used <= planned["ssd_bytes"], (used, parts)


def test_a_lora_plan_checks_the_adapter_it_starts_from_and_says_where_the_adapters_are(tmp_path, capsys):
    """A new-user pass: plan took lora.init_from=nowhere (train refuses it), and a CPU profile's plan said the
    adapters were on the GPU. The adapter is checked against the plan's settings, as train checks it."""
    from fuyou.planner.hardware import HardwareProfile, save_profile

    assert main(["train", "--out", str(tmp_path / "runs"), "model.preset=gpt-tiny", "lora.rank=2", "train.steps=1",
                 "train.eval_batches=1", "run.name=a"]) == 0
    assert main(["export", str(tmp_path / "runs" / "a"), "--out", str(tmp_path / "adapter")]) == 0
    profile = tmp_path / "cpu.json"
    save_profile(HardwareProfile(source="fuyou probe on vm (cpu)", device="cpu", fwd_flops=1e11, bwd_flops=1e11,
                                 matmul_flops=2e11, gpu_mem=2**34, h2d=1e15, d2h=1e15, ssd_read=2e9, ssd_write=2e9,
                                 ssd_capacity=2**40, cpu_adam=1e9), profile)
    capsys.readouterr()
    args = ["plan", "--model", "gpt-tiny", "--profile", str(profile), "--batch", "2", "--seq", "64",
            "--cpu-mem", "4GiB"]
    assert main([*args, "lora.rank=2", f"lora.init_from={tmp_path / 'nowhere'}"]) == 2
    assert "not a PEFT LoRA adapter directory" in capsys.readouterr().err
    assert main([*args, "lora.rank=4", f"lora.init_from={tmp_path / 'adapter'}"]) == 2
    assert "the adapter was trained with other settings (lora.rank" in capsys.readouterr().err
    assert main([*args, "lora.rank=2", f"lora.init_from={tmp_path / 'adapter'}"]) == 0
    out = capsys.readouterr().out
    assert "AdamW moments, in CPU memory, where the compute is)" in out and "on the GPU" not in out
