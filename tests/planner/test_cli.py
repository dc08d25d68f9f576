import json
import subprocess
import sys
import time

import pytest

from fuyou.cli import main
from fuyou.planner.hardware import load_profile


def test_plan_175b_answers_in_seconds_with_a_schedule(capsys):
    t0 = time.perf_counter()
    rc = main(["plan", "--model", "gpt3-175b", "--gpu", "h100", "--cpu-mem", "256GiB", "--ssd", "12xd7-p5510",
               "--batch", "16", "--seq", "1024"])
    elapsed = time.perf_counter() - t0
    out = capsys.readouterr().out
    assert rc == 0
    assert elapsed < 5.0
    for needle in ("predicted step", "bottleneck", "twice the SSDs", "SSD footprint", "CPU peak", "GPU peak",
                   "swap schedule", "block.95", "SSD write", "CPU Adam"):
        assert needle in out


def test_plan_command_line_is_fast_end_to_end():
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "fuyou.cli", "plan", "--model", "gpt3-175b", "--gpu", "rtx4090",
                          "--cpu-mem", "256GiB", "--ssd", "12xd7-p5510", "--batch", "4", "--seq", "1024"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert time.perf_counter() - t0 < 10.0  # interpreter and torch import included, on a shared 2-core machine
    assert "swap schedule" in out.stdout


def test_impossible_config_says_what_would_make_it_fit(capsys):
    rc = main(["plan", "--model", "gpt3-175b", "--gpu", "rtx4090", "--cpu-mem", "256GiB", "--ssd", "1x990-pro",
               "--batch", "16"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "DOES NOT FIT" in out and "what would make it fit" in out
    assert "GPU memory" in out and "batch" in out
    assert "SSD space" in out and "drives" in out
    assert "swap schedule" not in out


def test_plan_json_carries_policy_for_the_engine(capsys):
    from fuyou.planner.policy import ActivationPolicy

    assert main(["plan", "--model", "gpt3-1.3b", "--gpu", "rtx4090", "--ssd", "2x990-pro", "--cpu-mem", "32GiB",
                 "--batch", "8", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    pol = ActivationPolicy.from_json(data["policy"])
    assert len(pol.blocks) == 24 and data["step_s"] > 0 and data["tasks"]
    assert {t["resource"] for t in data["tasks"]} <= {"compute", "h2d", "d2h", "ssd-read", "ssd-write", "cpu-adam"}


def test_plan_fixed_policy_and_bad_inputs(capsys):
    assert main(["plan", "--model", "gpt3-1.3b", "--gpu", "a100-80gb", "--ssd", "4xpcie4-generic",
                 "--act-policy", "fc2,proj=cpu;0-3:checkpoint=ssd", "--batch", "4"]) == 0
    assert "cpu" in capsys.readouterr().out
    assert main(["plan", "--gpu", "gtx480", "--ssd", "d7-p5510"]) == 2
    assert "unknown GPU" in capsys.readouterr().err
    assert main(["plan", "--gpu", "h100", "--ssd", "3xfloppy"]) == 2
    assert "NxNAME" in capsys.readouterr().err
    assert main(["plan", "--gpu", "h100"]) == 2
    assert "no SSD given" in capsys.readouterr().err


def test_plot_is_written_or_skipped_cleanly(tmp_path, capsys):
    png = tmp_path / "step.png"
    assert main(["plan", "--model", "gpt3-1.3b", "--gpu", "rtx4090", "--ssd", "2x990-pro", "--batch", "4",
                 "--plot", str(png)]) == 0
    err = capsys.readouterr().err
    try:
        import matplotlib  # noqa: F401
        assert png.stat().st_size > 10_000
    except ImportError:
        assert "needs matplotlib" in err and not png.exists()


def test_probe_smoke_writes_a_profile_plan_can_use(tmp_path, capsys):
    prof = tmp_path / "profile.json"
    rc = main(["probe", "--ssd", str(tmp_path), "--out", str(prof), "--model", "gpt-test", "--batch", "2",
               "--seq", "32", "--io-bytes", "8MiB", "--adam-params", "100000", "--repeats", "1"])
    assert rc == 0
    p = load_profile(prof)
    assert p.ssd_read > 0 and p.ssd_write > 0 and p.cpu_adam > 0 and p.fwd_flops > 0
    assert 0.2 < p.adam_io_efficiency < 5  # a real job on the store, against the model's own prediction of it
    assert "out-of-core AdamW job" in capsys.readouterr().out
    assert main(["plan", "--model", "gpt-tiny", "--profile", str(prof), "--cpu-mem", "1GiB", "--batch", "2",
                 "--seq", "64"]) == 0
    assert "swap schedule" in capsys.readouterr().out


def test_probe_refuses_a_missing_directory(tmp_path, capsys):
    assert main(["probe", "--ssd", str(tmp_path / "nope")]) == 2
    assert "not a directory" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--batch", "--seq"])
def test_plan_rejects_nonpositive_sizes(flag, capsys):
    assert main(["plan", "--gpu", "h100", "--ssd", "d7-p5510", flag, "0"]) == 2
    assert "at least 1" in capsys.readouterr().err


def test_train_plan_auto_probes_plans_and_trains(tmp_path, capsys):
    from fuyou.cli import main

    ssd = tmp_path / "ssd"
    ssd.mkdir()
    rc = main(["train", "--offload", "ssd", "--ssd", str(ssd), "--cpu-mem", "1GiB", "--plan", "auto",
               "--out", str(tmp_path / "runs"), "model.preset=gpt-test", "data.seq_len=32",
               "train.micro_batch_size=2", "train.steps=2", "train.grad_clip=none", "train.eval_batches=1"])
    assert rc == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    assert "swap schedule" in err and "predicted step" in err
    (run_dir,) = (tmp_path / "runs").iterdir()
    names = {p.name for p in run_dir.iterdir()}
    assert {"act-policy.json", "hardware-profile.json", "config.toml", "model.safetensors"} <= names
    assert "act-policy.json" in (run_dir / "config.toml").read_text()  # the engine trained with the plan
