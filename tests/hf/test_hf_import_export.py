"""Hugging Face round trips: import -> logits equal transformers'; fine-tune; export -> transformers
loads it and its logits equal fuyou's. Tiny random models made in the test, nothing downloaded."""

import pytest
import torch
from safetensors import safe_open

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from hf_testutil import (finetune, fuyou_logits, fuyou_weights, hf_logits, make_hf_model, read_json,  # noqa: E402
                         tokens, write_fuyou_run)

from fuyou.cli import main  # noqa: E402
from fuyou.config import load_config  # noqa: E402
from fuyou.hf import export_run, open_checkpoint  # noqa: E402
from fuyou.train.run import import_checkpoint  # noqa: E402
from fuyou.models import ModelConfig, StageModel, preset  # noqa: E402


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {kind: make_hf_model(root / kind, kind) for kind in ("llama", "qwen2", "mistral", "gpt2")}


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral", "gpt2"])
def test_import_gives_transformers_logits(hf_models, tmp_path, kind):
    run = import_checkpoint(hf_models[kind], tmp_path / "run")
    x = tokens()
    torch.testing.assert_close(fuyou_logits(run / "model.safetensors", x), hf_logits(hf_models[kind], x),
                               rtol=0, atol=1e-4)
    # The run directory trains from itself, with the model's tokenizer.
    cfg = load_config(run / "config.toml")
    assert cfg.model.init_from == str(run.resolve()) and cfg.data.tokenizer == str((run / "hf").resolve())
    assert (run / "hf" / "tokenizer.json").is_file() and not list((run / "hf").glob("*.safetensors"))


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_streamed_init_values_equal_the_imported_weights(hf_models, tmp_path, kind):
    # What `fuyou train --init-from HF_DIR` streams per stage is what `fuyou import` writes.
    run = import_checkpoint(hf_models[kind], tmp_path / "run")
    cfg, imported = fuyou_weights(run / "model.safetensors")
    ckpt = open_checkpoint(hf_models[kind])
    assert ckpt.fields == {k: v for k, v in cfg.model_dump().items() if k in ckpt.fields}
    for stage in StageModel(cfg):
        for k, v in ckpt.init_values(stage).items():
            assert v.dtype == torch.float32 and torch.equal(v, imported[k]), k


@pytest.mark.parametrize("kind,offload", [("llama", False), ("llama", True), ("qwen2", True)])
def test_finetune_from_hf_dir_then_export(hf_models, tmp_path, kind, offload):
    src = hf_models[kind]
    run = finetune(tmp_path, ["--init-from", str(src)], offload)
    cfg = load_config(run / "config.toml")
    assert cfg.data.tokenizer == str(src.resolve())  # the model's tokenizer, chosen automatically

    # Training started from the Hugging Face weights and moved them a little (3 Adam steps of <= lr).
    _, start = fuyou_weights(import_checkpoint(src, tmp_path / "imported") / "model.safetensors")
    _, trained = fuyou_weights(run / "model.safetensors")
    moved = max(float((trained[k] - start[k]).abs().max()) for k in start)
    assert 0 < moved < 0.01

    out = tmp_path / "export"
    assert main(["export", str(run), "--out", str(out)]) == 0
    x = tokens()
    torch.testing.assert_close(hf_logits(out, x), fuyou_logits(run / "model.safetensors", x), rtol=0, atol=1e-4)
    assert read_json(out / "config.json")["architectures"] == read_json(src / "config.json")["architectures"]
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(out)).encode("def f(x):") == \
        AutoTokenizer.from_pretrained(str(src)).encode("def f(x):")


def test_import_then_train_from_its_config_then_export(hf_models, tmp_path, capsys):
    # GPT-2 (Conv1D layout, tied head): fuyou import -> fuyou train --config -> fuyou export.
    src = hf_models["gpt2"]
    imported = tmp_path / "imported"
    assert main(["import", str(src), "--out", str(imported)]) == 0
    run = finetune(tmp_path, ["--config", str(imported / "config.toml")], offload=True)
    out = tmp_path / "export"
    assert main(["export", str(run), "--out", str(out), "--dtype", "bf16", "--shard-size", "40KiB"]) == 0
    index = read_json(out / "model.safetensors.index.json")
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and "lm_head.weight" not in index["weight_map"]  # tied: transformers ties it
    # packed greedily, in order: a shard closes only when its next tensor would take it past 40 KiB (a shard a
    # tensor after the first split passed: a mutation audit)
    sizes = {}
    for s in shards:
        with safe_open(str(out / s), framework="pt") as f:
            sizes[s] = {k: f.get_tensor(k).numel() * 2 for k in f.keys()}
    order = list(index["weight_map"])
    for a, b in zip(shards, shards[1:]):
        first_next = min(sizes[b], key=order.index)
        assert sum(sizes[a].values()) + sizes[b][first_next] > 40 * 1024, (a, b)
    with safe_open(str(out / shards[0]), framework="pt") as f:
        assert all(f.get_tensor(k).dtype == torch.bfloat16 for k in f.keys())
    assert (out / "tokenizer.json").is_file()  # found through the run's init_from chain
    # Reloaded in fp32: fuyou's logits with the weights rounded to bf16.
    cfg, params = fuyou_weights(run / "model.safetensors")
    x = tokens()
    ours = StageModel(cfg).logits({k: v.bfloat16().float() for k, v in params.items()}, x)
    torch.testing.assert_close(hf_logits(out, x), ours, rtol=0, atol=1e-4)


@pytest.mark.parametrize("name,update", [
    ("gpt-test", {}), ("llama-test", {}), ("llama-test", {"attn_bias": True, "tie_embeddings": True}),
])
def test_export_of_a_model_trained_from_scratch(tmp_path, name, update):
    # No Hugging Face source: config.json is written from the model config (attn_bias -> Qwen2).
    cfg = ModelConfig(**{**preset(name), **update})
    model = StageModel(cfg)
    params = {k: v + 0.01 * torch.randn_like(v) for k, v in model.init_params(seed=5).items()}
    files = export_run(write_fuyou_run(tmp_path / "run", cfg, params), tmp_path / "out")
    assert "model.safetensors" in files and not (tmp_path / "out" / "tokenizer.json").exists()
    x = tokens(t=16)
    torch.testing.assert_close(hf_logits(tmp_path / "out", x), model.logits(params, x), rtol=0, atol=1e-4)
    if cfg.attn_bias:
        assert read_json(tmp_path / "out" / "config.json")["architectures"] == ["Qwen2ForCausalLM"]


def test_a_model_trained_on_bytes_round_trips_through_its_export(tmp_path, capsys):
    """A preset trained on the embedded corpus (byte ids) exports without tokenizer files; `--init-from` the
    export was refused for want of them (a pass). The export records fuyou_tokenizer=byte, the new run reads
    bytes again, and a step at lr 0 keeps the weights bit for bit."""
    out, ex = tmp_path / "runs", tmp_path / "ex"
    small = ["train.precision=fp32", "data.seq_len=32", "train.micro_batch_size=2", "train.eval_every=0",
             "train.eval_batches=1", "train.steps=1"]
    assert main(["train", "--model", "gpt-test", "--out", str(out), "run.name=a", *small]) == 0
    assert main(["export", str(out / "a"), "--out", str(ex)]) == 0
    assert "fuyou_tokenizer=byte" in capsys.readouterr().err
    assert read_json(ex / "config.json")["fuyou_tokenizer"] == "byte"
    assert main(["train", "--init-from", str(ex), "--out", str(out), "run.name=b", *small, "optim.lr=0"]) == 0
    assert load_config(out / "b" / "config.toml").data.tokenizer == "byte"
    (_, a), (_, b) = fuyou_weights(out / "a" / "model.safetensors"), fuyou_weights(out / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_gpt2_checkpoint_without_the_transformer_prefix(hf_models, tmp_path):
    # The Hub's original gpt2 weights are named "h.0.attn.c_attn.weight", "wte.weight", ...
    from safetensors.torch import load_file, save_file

    src = tmp_path / "gpt2"
    src.mkdir()
    for f in hf_models["gpt2"].iterdir():
        if f.suffix != ".safetensors":
            (src / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(hf_models["gpt2"] / "model.safetensors"))
    save_file({k.removeprefix("transformer."): v for k, v in tensors.items()}, str(src / "model.safetensors"),
              metadata={"format": "pt"})
    run = import_checkpoint(src, tmp_path / "run")
    x = tokens()
    torch.testing.assert_close(fuyou_logits(run / "model.safetensors", x), hf_logits(hf_models["gpt2"], x),
                               rtol=0, atol=1e-4)


def test_compressed_state_finetune_then_export_in_the_masters_precision(hf_models, tmp_path):
    """Issue 19: fine-tune a Hugging Face Llama with optim.master=bf16 optim.moments=int8 on the SSD;
    model.safetensors holds the bf16 master's values exactly (fp32 file), an export with --dtype bf16
    loses nothing, and transformers' logits match fuyou's."""
    src = hf_models["llama"]
    run = finetune(tmp_path, ["--init-from", str(src), "optim.master=bf16", "optim.moments=int8"], offload=True)
    cfg, trained = fuyou_weights(run / "model.safetensors")
    assert all(torch.equal(v, v.bfloat16().float()) for v in trained.values())  # bf16 values
    out = tmp_path / "export"
    assert main(["export", str(run), "--out", str(out), "--dtype", "bf16"]) == 0
    x = tokens()
    torch.testing.assert_close(hf_logits(out, x), fuyou_logits(run / "model.safetensors", x), rtol=0, atol=1e-4)


def _train_from(src, tmp_path, *extra):
    ssd = tmp_path / "ssd"
    ssd.mkdir(exist_ok=True)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("a small corpus for a tokenizer of 300 tokens. " * 200)
    assert main(["train", "--init-from", str(src), "--out", str(tmp_path / "runs"), "--offload", "ssd", "--ssd",
                 str(ssd), "offload.cpu_mem=256MiB", "run.name=r", "train.precision=fp32", "data.source=text",
                 f"data.path={corpus}", "data.seq_len=16", "train.micro_batch_size=2", "train.eval_every=0",
                 *extra]) == 0
    return tmp_path / "runs" / "r"


def test_a_moved_runs_snapshot_exports_with_its_own_runs_files(hf_models, tmp_path, capsys):
    """A new-user pass moved a run, started another of the same name from another model, and exported the
    moved run's snapshot: it took the new run's tokenizer and config (the snapshot's config.toml names its
    run by the path it had). A snapshot's files now come from the run it lies in."""
    import shutil

    src = tmp_path / "src"
    shutil.copytree(hf_models["llama"], src)
    run = _train_from(src, tmp_path, "--steps", "3", "train.save_every=2")
    moved = tmp_path / "moved"
    moved.mkdir()
    run.rename(moved / "r")
    shutil.rmtree(src)
    other = _train_from(hf_models["gpt2"], tmp_path, "--steps", "1")  # the same run name, another model
    assert read_json(other / "hf" / "config.json")["model_type"] == "gpt2"
    (other / "hf" / "tokenizer_config.json").write_text('{"marker": "the other run\'s tokenizer"}')
    assert main(["export", str(moved / "r" / "snapshots" / "step-000002"), "--out", str(tmp_path / "exp")]) == 0
    out = tmp_path / "exp"
    assert read_json(out / "config.json")["model_type"] == "llama"
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (moved / "r" / "hf" / name).read_bytes()


def test_a_resume_after_the_source_checkpoint_is_gone_reads_the_runs_copy(hf_models, tmp_path, capsys):
    """A cleared model cache stranded a stopped run: the resume opened model.init_from and data.tokenizer,
    both the deleted source, though the state and the run's copy of the tokenizer (RUN/hf) were intact."""
    import shutil

    src = tmp_path / "src"
    shutil.copytree(hf_models["llama"], src)
    run = _train_from(src, tmp_path, "--steps", "2", "offload.keep_state=true", "run.save_weights=false")
    shutil.rmtree(src)
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--steps", "3"]) == 0
    err = capsys.readouterr().err
    assert f"the run's tokenizer {src} no longer exists: reading the copy the run keeps" in err
    assert "done: steps 3-3 of 3" in err


@pytest.mark.parametrize("base_tokenizer,lora,prepared", [(True, False, False), (False, False, False),
                                                           (True, True, False), (True, False, True)])
def test_the_export_carries_the_tokenizer_the_data_was_tokenized_with(tmp_path, capsys, base_tokenizer, lora,
                                                                      prepared):
    """A pass: a model trained on chats rendered with another tokenizer's template (data.tokenizer=DIR, or data
    prepared with it) was exported with the base's tokenizer, its template the one not trained on; a base
    without a tokenizer, trained with data.tokenizer=DIR as import's error advises, was exported with none. The
    export carries the data's tokenizer files (a full model, a PEFT adapter), with a note."""
    import json
    import shutil

    from transformers import AutoTokenizer

    src = make_hf_model(tmp_path / "base", "llama", tokenizer=base_tokenizer)
    chatml = tmp_path / "chatml"
    make_hf_model(tmp_path / "donor", "llama")
    chatml.mkdir()
    for f in (tmp_path / "donor").iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, chatml / f.name)
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<eos>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    (chatml / "chat_template.jinja").write_text(template)
    if base_tokenizer:
        (src / "chat_template.jinja").write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}"
                                                 "<eos>{% endfor %}")
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"hello {i}"},
                                                      {"role": "assistant", "content": f"hi there {i}"}]}) + "\n"
                             for i in range(12)))
    data = [f"data.path={chats}", f"data.tokenizer={chatml}"]
    if prepared:  # (the tokenizer its meta.json records)
        assert main(["data", "prepare", str(chats), "--out", str(tmp_path / "prep"), "--tokenizer", str(chatml)]) == 0
        data = [f"data.path={tmp_path / 'prep'}"]
    assert main(["train", "--init-from", str(src), "--out", str(tmp_path / "runs"), "--steps", "1", "run.name=r",
                 *data, "data.seq_len=128", "train.micro_batch_size=2",
                 "train.eval_every=0", *(["lora.rank=2"] if lora else [])]) == 0
    err = capsys.readouterr().err
    assert (f"fuyou: note: the data was tokenized with {chatml}, whose chat template differs from" in err) == \
        base_tokenizer
    assert main(["export", str(tmp_path / "runs" / "r"), "--out", str(tmp_path / "out")]) == 0
    assert f"the tokenizer files are those of {chatml}, which the data was tokenized with" in capsys.readouterr().err
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tok.chat_template == template and not (tmp_path / "runs" / "r" / "chat_template.jinja").exists()
    made = tok.apply_chat_template([{"role": "user", "content": "hello 1"}], tokenize=False,
                                   add_generation_prompt=True)
    assert made == "<|im_start|>user\nhello 1<eos>\n<|im_start|>assistant\n"


def test_the_export_keeps_the_tokenizer_trained_when_the_base_changes_and_reads_no_relative_path(tmp_path, capsys,
                                                                                                  monkeypatch):
    """A review: data.tokenizer 'auto' resolves to the base's directory, which the export then took for another
    tokenizer and shipped (edited since) over the copy the run trained with; a relative data.tokenizer was
    read from export's working directory; a preset run with data.tokenizer=DIR got two contradicting notes."""
    from fuyou.tomlfile import read_toml

    src = make_hf_model(tmp_path / "base", "llama")
    chats = tmp_path / "c.jsonl"
    chats.write_text("".join(f'{{"prompt": "q{i}", "completion": " answer {i}"}}\n' for i in range(8)))
    common = ["--out", str(tmp_path / "runs"), "--steps", "1", f"data.path={chats}", "data.seq_len=64",
              "train.micro_batch_size=2", "train.eval_every=0"]
    assert main(["train", "--init-from", str(src), *common, "run.name=auto"]) == 0
    (src / "chat_template.jinja").write_text("{{ messages }}")  # the base edited after the run
    capsys.readouterr()
    assert main(["export", str(tmp_path / "runs" / "auto"), "--out", str(tmp_path / "e1")]) == 0
    assert "tokenizer files are those of" not in capsys.readouterr().err
    assert not (tmp_path / "e1" / "chat_template.jinja").exists()  # the copy the run trained with
    monkeypatch.chdir(tmp_path)
    assert main(["train", "model.preset=gpt-tiny", "model.vocab_size=512", "data.tokenizer=base", *common,
                 "run.name=rel"]) == 0
    assert read_toml(tmp_path / "runs" / "rel" / "config.toml")["data"]["tokenizer"] == str(src)
    monkeypatch.chdir(tmp_path / "runs")
    capsys.readouterr()
    assert main(["export", str(tmp_path / "runs" / "rel"), "--out", str(tmp_path / "e2")]) == 0
    err = capsys.readouterr().err
    assert f"the tokenizer files are those of {src}" in err and "has no tokenizer files" not in err
    assert (tmp_path / "e2" / "tokenizer.json").is_file()


@pytest.mark.parametrize("lora,prepared,offload", [(False, False, False), (True, False, True), (False, True, True)])
def test_a_model_trained_on_the_fallback_chat_format_exports_it_as_its_chat_template(tmp_path, capsys, lora,
                                                                                     prepared, offload):
    """A new-user pass: chats over a tokenizer without a chat template are rendered in fuyou's ChatML-style
    fallback, and the export carried no template (apply_chat_template refused the model), while its note said
    the chat template was the one trained on. The run keeps the fallback as a template, and the export (a full
    model, a PEFT adapter; from data tokenized in the run or prepared) writes it: apply_chat_template then gives
    the tokens trained on."""
    import json

    from transformers import AutoTokenizer

    from fuyou.data import tokenize_records

    src = make_hf_model(tmp_path / "base", "llama")  # its tokenizer has no chat template
    chats = tmp_path / "chats.jsonl"
    records = [{"messages": [{"role": "user", "content": f"hello {i}"},
                             {"role": "assistant", "content": f"hi there {i}"}]} for i in range(12)]
    chats.write_text("".join(json.dumps(r) + "\n" for r in records))
    data = [f"data.path={chats}"]
    if prepared:
        assert main(["data", "prepare", str(chats), "--out", str(tmp_path / "prep"), "--tokenizer", str(src)]) == 0
        data = [f"data.path={tmp_path / 'prep'}"]
    ssd = tmp_path / "ssd"
    ssd.mkdir()
    assert main(["train", "--init-from", str(src), "--out", str(tmp_path / "runs"), "--steps", "1", "run.name=r",
                 *data, "data.seq_len=64", "train.micro_batch_size=2", "train.eval_every=0",
                 *(["lora.rank=2"] if lora else []),
                 *(["--offload", "ssd", "--ssd", str(ssd), "offload.cpu_mem=256MiB"] if offload else [])]) == 0
    assert "`fuyou export` writes it as the model's chat template" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "runs" / "r"), "--out", str(tmp_path / "out")]) == 0
    assert "the export carries it as its chat template" in capsys.readouterr().err
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    trained = tokenize_records([chats], str(src), val_fraction=0.0).train
    first = [int(t) for t in trained.tokens[int(trained.offsets[0]):int(trained.offsets[1])]]
    assert tok.apply_chat_template(records[0]["messages"], tokenize=True, return_dict=False) == first
    assert json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())["chat_template"] == tok.chat_template
    # tokenizer files that carry a template keep it: the run's is written only where there is none
    from fuyou.hf.source import HF_META

    own = "{% for m in messages %}{{ m['content'] }}<eos>{% endfor %}"
    (tmp_path / "runs" / "r" / HF_META / "chat_template.jinja").write_text(own)
    assert main(["export", str(tmp_path / "runs" / "r"), "--out", str(tmp_path / "out2")]) == 0
    assert "the export carries it as its chat template" not in capsys.readouterr().err
    assert AutoTokenizer.from_pretrained(tmp_path / "out2").chat_template == own
