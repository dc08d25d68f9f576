import json

import torch
from safetensors.torch import load_file

from fuyou.cli import main
from fuyou.config import load_config
from fuyou.models import StageModel
from fuyou.train.loop import run_training
from fuyou.train.reference import ReferenceTrainer
from fuyou.optim.schedule import lr_at


def test_default_run_lowers_the_loss_and_writes_a_run_dir(tmp_path, capsys):
    # The README's first command, shortened: same model, data and settings, fewer steps.
    rc = main(["train", "train.steps=30", "train.micro_batch_size=8", "train.eval_batches=2", "train.warmup_steps=5", "--out", str(tmp_path)])
    assert rc == 0
    (run_dir,) = tmp_path.iterdir()
    from fuyou.train.metrics import tensorboard_available

    tb = {"tb"} if tensorboard_available() else set()  # TensorBoard event files when it is installed
    assert {p.name for p in run_dir.iterdir()} == {"config.toml", "metrics.jsonl", "model.safetensors"} | tb
    lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [l["eval_loss"] for l in lines if "eval_loss" in l]
    assert evals[-1] < evals[0] - 1.0, evals
    steps = [l for l in lines if "loss" in l]
    assert all(l["tokens_per_s"] > 0 and l["tflops"] > 0 for l in steps)
    weights = load_file(str(run_dir / "model.safetensors"))
    cfg = load_config(run_dir / "config.toml")
    assert weights.keys() == StageModel(cfg.model).param_specs().keys()
    err = capsys.readouterr().err
    assert "TFLOPS" in err and "tok/s" in err and "eval loss" in err


def test_grad_accumulation_averages_micro_batches(tmp_path):
    # One step with grad_accum=2 gives the gradient of the mean of the two micro-batch losses.
    cfg = load_config(overrides=["model.preset=gpt-test", "train.precision=fp32", "train.grad_accum=2",
                                 "train.micro_batch_size=2", "data.seq_len=16", "train.grad_clip=none",
                                 f"run.out_dir={tmp_path}"])
    tr = ReferenceTrainer(cfg, None if cfg.data.source == "synthetic" else __import__("fuyou.data").data.load_data(cfg.data))
    p0 = {k: v.detach().clone().requires_grad_(True) for k, v in tr.params.items()}
    losses = []
    for j in range(2):
        x, y, _ = tr.batches.batch(j)
        losses.append(tr.model.forward_loss(p0, x, y))
    (sum(losses) / 2).backward()
    tr.train_step(0)
    opt = torch.optim.AdamW([p0[k] for k in tr.params], lr=lr_at(0, cfg.optim.lr, cfg.train.steps, cfg.train.warmup_steps, cfg.train.min_lr_ratio),
                            betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps, weight_decay=0.0, foreach=False)
    # compare the parameters without weight decay (the two optimizers use different decay groups);
    # summation order differs (two backward passes vs one), hence a tight tolerance, not equality
    specs = tr.model.param_specs()
    opt.step()
    for k, s in specs.items():
        if not s.decay:
            torch.testing.assert_close(tr.params[k].detach(), p0[k].detach(), rtol=1e-5, atol=1e-7, msg=k)


def test_llama_trains_on_synthetic_data(tmp_path):
    cfg = load_config(overrides=["model.preset=llama-test", "data.source=synthetic", "data.seq_len=32",
                                 "train.steps=3", "train.micro_batch_size=2", f"run.out_dir={tmp_path}"])
    result = run_training(cfg)
    assert result.first_eval is None and result.last_loss > 0


def test_cli_reports_bad_overrides(capsys):
    assert main(["train", "train.stepz=3"]) == 2
    assert "unknown key 'train.stepz'" in capsys.readouterr().err
    assert main(["train", "--model", "nope"]) == 2
    assert "unknown model preset" in capsys.readouterr().err


def test_models_lists_presets_with_bytes(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "gpt3-175b" in out and "175B" in out and "650.45 GiB" in out and "llama-70b" in out


def test_models_counts_a_bf16_master_once(capsys):
    """With optim.master=bf16 the master is the compute copy: the total added it twice (13B: 72.20 GiB in
    'total' against 48.26 GiB in the bf16/int8 column for the same settings)."""
    assert main(["models", "--master", "bf16", "--moments", "int8"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("gpt3-13b "))
    assert "(master)" in row and row.count("48.26 GiB") == 2, row


def test_models_counts_the_compute_copy_in_the_precision_given(capsys):
    """--precision fp32 (what train.precision=auto takes on most CPUs): the fp32 master is the compute weights,
    and a bf16 master is not, its compute copy 4 B a parameter (the table counted bf16's 2 B whatever the run
    would compute in)."""
    assert main(["models", "--precision", "fp32"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("gpt3-13b "))
    assert "fp32 weights" in out and "fp32 compute copy of 4 B (the fp32 master is it" in out
    assert "(master)" in row and "143.65 GiB" in row and row.endswith("96.14 GiB"), row  # 12 B; 4.03 + 4
    assert main(["models", "--precision", "fp32", "--master", "bf16", "--moments", "int8"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("gpt3-13b "))
    assert "(master)" not in row and "47.88 GiB" in row and row.count("96.14 GiB") == 2, row
