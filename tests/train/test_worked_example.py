"""The README's worked example, as a user runs it: a tiny Llama 3.1-shaped checkpoint and a chat JSONL
(tools/make_tiny_checkpoint.py), `fuyou data prepare`, SSD-offloaded training with masking and packing,
`fuyou export`, and the export loaded in transformers with fuyou's logits."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parents[2]


@pytest.mark.parametrize("family", ["llama3.1", "qwen3"])
def test_readme_fine_tuning_example(tmp_path, family):
    pytest.importorskip("transformers")
    from fuyou.cli import main

    model, chat = tmp_path / "tiny", tmp_path / "chat.jsonl"
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "make_tiny_checkpoint.py"), "--family", family,
                        "--out", str(model), "--chat-data", str(chat)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert main(["data", "prepare", str(chat), "--out", str(tmp_path / "data"), "--tokenizer", str(model)]) == 0
    (tmp_path / "ssd").mkdir()
    assert main(["train", "--init-from", str(model), "--offload", "ssd", "--ssd", str(tmp_path / "ssd"),
                 "--cpu-mem", "4GiB", f"data.path={tmp_path / 'data'}", "data.seq_len=512", "train.epochs=1",
                 "train.micro_batch_size=4", "optim.lr=1e-3", "run.name=chat", "--out", str(tmp_path / "runs"),
                 "train.precision=fp32", "offload.resident_mem=0"]) == 0
    run = tmp_path / "runs" / "chat"
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [x["eval_loss"] for x in lines if "eval_loss" in x]
    assert evals[-1] < evals[0]  # it learned
    assert main(["export", str(run), "--out", str(tmp_path / "hf")]) == 0

    from transformers import AutoModelForCausalLM, AutoTokenizer

    sys.path.insert(0, str(ROOT / "tests" / "hf"))
    from hf_testutil import fuyou_logits

    tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    ids = tok.apply_chat_template([{"role": "user", "content": "What is a list?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(ids).logits.float()
    ours = fuyou_logits(run / "model.safetensors", ids)
    assert type(hf).__name__ == ("LlamaForCausalLM" if family == "llama3.1" else "Qwen3ForCausalLM")
    assert (ours - theirs).abs().max() < 1e-4
