"""A new-user pass on the data path (2026-12-05): each test is one finding, reproduced, then fixed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from fuyou.data import DataConfig, load_data, read_data, tokenize_records
from fuyou.data.dataset import write_prepared
from fuyou.data.examples import write_examples
from fuyou.errors import DataError

sys.path.insert(0, str(Path(__file__).parents[1] / "hf"))


@pytest.fixture(scope="module")
def big_vocab(tmp_path_factory):
    """A word-level tokenizer of 70,003 ids, its end-of-sequence id below 65,536 (as Mistral-Nemo's)."""
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "</s>": 1, "<pad>": 2, **{f"w{i}": i + 3 for i in range(70000)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    d = tmp_path_factory.mktemp("bigtok")
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>").save_pretrained(d)
    return d


def _jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.mark.parametrize("kind", ["text", "prompt_completion"])
def test_held_out_ids_above_16_bits_are_kept_beside_a_training_split_below(tmp_path, big_vocab, kind):
    """The held-out split was stored in the training split's type: id 70002 became 4466 in silence (text),
    or the prepared directory could not be read back (examples)."""
    def rec(words):
        return {"text": words} if kind == "text" else {"prompt": "w1 w2", "completion": words}

    train = _jsonl(tmp_path / "train.jsonl", [rec(" ".join(f"w{i}" for i in range(k, k + 40))) for k in range(30)])
    held = _jsonl(tmp_path / "held.jsonl", [rec("w69999 w5 w69998")])
    data = tokenize_records([train], str(big_vocab), eval_paths=[held])
    out = tmp_path / "prepared"
    (write_prepared if kind == "text" else write_examples)(out, data)
    back = read_data(out)
    val = np.asarray(back.val if kind == "text" else back.val.tokens).astype(np.int64)
    assert 70002 in val.tolist() and 70001 in val.tolist(), val


def test_a_dataset_card_in_a_data_directory_is_not_trained_on(tmp_path, capsys):
    d = tmp_path / "ds"
    (d / "data").mkdir(parents=True)
    _jsonl(d / "data" / "train.jsonl", [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(20)])
    (d / "README.md").write_text("---\nlicense: mit\n---\n# Dataset card\n")
    (d / "LICENSE").write_text("MIT\n")
    data = tokenize_records([d], "byte", val_fraction=0.1)
    assert data.info["records"] == 20
    err = capsys.readouterr().err
    assert "README.md (a dataset card or project file, not data" in err and "LICENSE" in err
    assert len(tokenize_records([d / "README.md"], "byte").train) > 0  # given by name, it is read


def test_the_path_decides_text_or_prepared_over_a_saved_source(tmp_path):
    """A run's config.toml records data.source; `--config RUN/config.toml data.path=OTHER` of the other kind
    was refused with an error about the wrong thing."""
    text = _jsonl(tmp_path / "t.jsonl", [{"text": "hello world " * 20}] * 4)
    prepared = tmp_path / "p"
    write_prepared(prepared, tokenize_records([text], "byte", val_fraction=0.2))
    assert DataConfig(source="prepared", path=[str(text)]).source == "text"
    assert DataConfig(source="text", path=[str(prepared)]).source == "prepared"
    with pytest.raises(ValueError, match="data.source='builtin' does not read it"):
        DataConfig(source="builtin", path=[str(text)])
    with pytest.raises(ValueError, match="is a `fuyou data prepare` directory: held-out files are given"):
        DataConfig(path=[str(text)], eval_path=[str(prepared)])


def test_held_out_data_inside_the_training_data_gets_a_note(tmp_path, capsys):
    d = tmp_path / "d"
    d.mkdir()
    a = _jsonl(d / "a.jsonl", [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(5)])
    _jsonl(d / "b.jsonl", [{"prompt": f"r{i}", "completion": f"b{i}"} for i in range(5)])
    tokenize_records([d], "byte", eval_paths=[a])
    assert f"the held-out data {a} is (in) the training data" in capsys.readouterr().err
    tokenize_records([a], "byte", eval_paths=[a])
    assert "is (in) the training data" in capsys.readouterr().err
    tokenize_records([d / "b.jsonl"], "byte", eval_paths=[a])
    assert "training data" not in capsys.readouterr().err


def test_held_out_files_of_moved_prepared_data_use_the_tokenizer_given(tmp_path, big_vocab, capsys):
    import shutil

    tok = tmp_path / "tokA2"
    shutil.copytree(big_vocab, tok)
    train = _jsonl(tmp_path / "train.jsonl", [{"prompt": "w1", "completion": f"w{i} w{i + 1}"} for i in range(20)])
    held = _jsonl(tmp_path / "held.jsonl", [{"prompt": "w1", "completion": "w7 w8"}])
    write_examples(tmp_path / "p", tokenize_records([train], str(tok), val_fraction=0.1))
    tok.rename(tmp_path / "tokA3")
    cfg = DataConfig(path=[str(tmp_path / "p")], eval_path=[str(held)], tokenizer=str(tmp_path / "tokA3"))
    data = load_data(cfg)
    assert len(data.val) == 1
    assert "replaces the held-out split prepared in" in capsys.readouterr().err
    with pytest.raises(DataError, match="which is gone: give data.tokenizer=DIR"):
        load_data(DataConfig(path=[str(tmp_path / "p")], eval_path=[str(held)]))


def test_tokenizer_paths_that_are_not_tokenizer_directories(tmp_path, big_vocab):
    from fuyou.data.tokenizer import load_tokenizer

    with pytest.raises(DataError, match=f"is a file: give the directory that holds a tokenizer's files.*, {big_vocab}"):
        load_tokenizer(str(big_vocab / "tokenizer.json"))
    _jsonl(tmp_path / "x.jsonl", [{"text": "a"}])  # (its directory named as the one to give, where it held none)
    with pytest.raises(DataError, match="is a file: .*; its directory holds none"):
        load_tokenizer(str(tmp_path / "x.jsonl"))
    (tmp_path / "data").mkdir()
    _jsonl(tmp_path / "data" / "x.jsonl", [{"text": "a"}])
    with pytest.raises(DataError, match="holds no tokenizer"):
        load_tokenizer(str(tmp_path / "data"))


def test_json_files_of_one_object_and_messages_in_json_words(tmp_path):
    (tmp_path / "one.json").write_text('{"prompt": "q", "completion": "a"}')
    assert tokenize_records([tmp_path / "one.json"], "byte").info["records"] == 1
    (tmp_path / "wrapped.json").write_text('{"data": [{"text": "a"}]}')
    with pytest.raises(DataError, match=r"give the array inside it \('data'\) as its own file"):
        tokenize_records([tmp_path / "wrapped.json"], "byte")
    _jsonl(tmp_path / "n.jsonl", [{"prompt": None, "completion": "a"}])
    with pytest.raises(DataError) as e:
        tokenize_records([tmp_path / "n.jsonl"], "byte", fmt="prompt_completion")
    assert "NoneType" not in str(e.value)
    chat = _jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(DataError, match=r"data.format=text, --format text\); its keys are \['messages'\]"):
        tokenize_records([chat], "byte", fmt="text")


def test_text_prepared_over_examples_leaves_no_stale_files(tmp_path):
    recs = _jsonl(tmp_path / "r.jsonl", [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(10)])
    text = _jsonl(tmp_path / "t.jsonl", [{"text": "hello world " * 20}] * 4)
    write_examples(tmp_path / "p", tokenize_records([recs], "byte", val_fraction=0.2))
    write_prepared(tmp_path / "p", tokenize_records([text], "byte", val_fraction=0.2))
    assert sorted(f.name for f in (tmp_path / "p").iterdir()) == ["meta.json", "train.bin", "val.bin"]


def test_an_empty_assistant_answer_with_loss_gets_a_note(tmp_path, capsys):
    chat = _jsonl(tmp_path / "c.jsonl", [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " ", "weight": 0},
                      {"role": "user", "content": "so?"}, {"role": "assistant", "content": "yes"}]}])
    tokenize_records([chat], "byte", val_fraction=0.3)
    err = capsys.readouterr().err
    assert "1 assistant turn(s) or completion(s) with empty content carry loss" in err, err
    assert "c.jsonl:2: messages[1]" in err, err
    # an empty completion is the same (it trained on the EOS token alone, in silence: a new-user pass)
    pc = _jsonl(tmp_path / "p.jsonl", [{"prompt": "p", "completion": "a"}, {"prompt": "p", "response": ""}])
    tokenize_records([pc], "byte", val_fraction=0.3)
    assert "1 assistant turn(s) or completion(s) with empty content" in capsys.readouterr().err


def test_messages_of_unknown_roles_are_named(tmp_path, capsys):
    """A 'bot' (or Gemini's 'model') answer was prompt without a word; a file of them only said "no assistant
    turn to learn" (a new-user pass)."""
    from fuyou.errors import DataError

    chat = [{"role": "user", "content": "hi"}, {"role": "bot", "content": "hello"}, {"role": "user", "content": "so?"},
            {"role": "assistant", "content": "yes"}]
    tokenize_records([_jsonl(tmp_path / "c.jsonl", [{"messages": chat}] * 4)], "byte", val_fraction=0.3)
    assert "roles other than system, developer, user, assistant, tool, function, ipython are prompt, without loss: " \
           "'bot' (4x); if they are the model's answers, name their role 'assistant'" in capsys.readouterr().err
    gemini = [{"role": "user", "content": "hi"}, {"role": "model", "content": "hello"}]
    with pytest.raises(DataError, match="no usable example.*'model' \\(2x\\)"):
        tokenize_records([_jsonl(tmp_path / "g.jsonl", [{"messages": gemini}] * 2)], "byte")


def test_a_text_corpus_keeps_its_readmes_and_a_foreign_meta_json_is_text(tmp_path, capsys):
    """The review of the fixes: a README is text in a directory of text (a documentation corpus), and a
    dataset's own meta.json does not make its directory 'prepared'."""
    d = tmp_path / "docs"
    d.mkdir()
    (d / "README.md").write_text("# Project\n" + "words " * 50)
    (d / "guide.md").write_text("guide " * 50)
    (d / "meta.json").write_text('{"name": "my docs", "license": "mit"}')
    data = tokenize_records([d], "byte", val_fraction=0.1)
    assert data.documents == 2
    assert DataConfig(path=[str(d)]).source == "text"
    assert DataConfig(source="prepared", path=[str(d)]).source == "text"
    with pytest.raises(ValueError, match="exactly one directory"):
        DataConfig(source="prepared", path=[str(d), str(d / "guide.md")])


def test_prepare_counts_held_out_records_apart(tmp_path, capsys):
    """`fuyou data prepare` said "read 8 records" for 5 training records and 3 held-out ones (--eval)."""
    from fuyou.cli import main

    train = _jsonl(tmp_path / "t.jsonl", [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(5)])
    held = _jsonl(tmp_path / "h.jsonl", [{"prompt": f"r{i}", "completion": f"b{i}"} for i in range(3)])
    assert main(["data", "prepare", str(train), "--eval", str(held), "--out", str(tmp_path / "p")]) == 0
    out = capsys.readouterr().out
    assert "read 8 records (prompt_completion), 3 of them held-out (--eval)" in out and "5 train" in out
    texts = [tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / "c.txt"]
    for i, t in enumerate(texts):
        t.write_text(f"document {i} " * 40)
    assert main(["data", "prepare", str(texts[0]), str(texts[1]), "--eval", str(texts[2]),
                 "--out", str(tmp_path / "q")]) == 0
    assert "read 3 documents, 1 of them held-out (--eval)" in capsys.readouterr().out


def test_held_out_examples_that_are_training_examples_get_a_note(tmp_path, capsys):
    """A copy of the training file as --eval, or the file itself as data.eval_path over prepared data, passed
    without a word: the path check cannot see either (a new-user pass). The examples are compared."""
    from fuyou.cli import main

    recs = _jsonl(tmp_path / "r.jsonl", [{"prompt": f"question {i}", "completion": f" answer {i}"} for i in range(40)])
    copy = tmp_path / "copy.jsonl"
    copy.write_text(recs.read_text())
    assert main(["data", "prepare", str(recs), "--out", str(tmp_path / "p1"), "--eval", str(copy)]) == 0
    assert "40 of the 40 held-out examples" in capsys.readouterr().err
    assert main(["data", "prepare", str(recs), "--out", str(tmp_path / "p2"), "--val-fraction", "0.25"]) == 0
    assert "held-out examples" not in capsys.readouterr().err  # (a split of its own: none shared)
    assert main(["train", "--out", str(tmp_path / "runs"), f"data.path={tmp_path / 'p2'}", f"data.eval_path={recs}",
                 "train.steps=1", "model.preset=gpt-test", "data.seq_len=32", "train.eval_every=0"]) == 0
    trained = json.loads((tmp_path / "p2" / "meta.json").read_text())["train_examples"]  # (about 30: held_out)
    assert 20 < trained < 40 and f"{trained} of the 40 held-out examples" in capsys.readouterr().err


def test_a_tokenizer_larger_than_the_model_is_refused_only_for_ids_the_model_lacks(tmp_path, big_vocab):
    """A tokenizer with added tokens (one more than the model's vocab_size) was refused with "set
    model.vocab_size >= N", which a pretrained model's shape overrides (a new-user pass). The data's ids
    decide; the advice names both cases."""
    from fuyou.errors import DataError

    data = tokenize_records([_jsonl(tmp_path / "t.jsonl", [{"text": "w1 w2 w3 " * 30}] * 3)], str(big_vocab))
    data.check_fits(8, 100)  # the tokenizer has 70,003 tokens; this data uses ids below 100
    with pytest.raises(DataError, match=r"holds token id \d+, beyond the model's vocabulary of 5 .*has 70003 tokens.*"
                                        r"resize_token_embeddings"):
        data.check_fits(8, 5)


def test_val_fraction_zero_holds_out_nothing(tmp_path, capsys):
    """--val-fraction 0 (train on every record) was refused as "between 0 and 1"; now it holds out nothing,
    and training says evaluation is off for that reason. `fuyou data` alone shows its own actions."""
    from fuyou.cli import main

    recs = _jsonl(tmp_path / "r.jsonl", [{"prompt": f"q{i}", "completion": f" a{i}"} for i in range(20)])
    assert main(["data", "prepare", str(recs), "--out", str(tmp_path / "p"), "--val-fraction", "0"]) == 0
    assert "wrote 20 train and 0 held-out examples" in capsys.readouterr().out
    assert main(["train", "--out", str(tmp_path / "runs"), f"data.path={tmp_path / 'p'}", "model.preset=gpt-test",
                 "data.seq_len=32", "train.steps=1"]) == 0
    assert "the prepared data holds no held-out example: evaluation is off" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "runs"), f"data.path={recs}", "data.val_fraction=0",
                 "model.preset=gpt-test", "data.seq_len=32", "train.steps=1"]) == 0
    assert "no example is held out (data.val_fraction=0)" in capsys.readouterr().err
    assert main(["data"]) == 2
    assert "prepare" in capsys.readouterr().out


def test_held_out_examples_stay_held_out_when_records_are_added_and_repeats_fall_on_one_side(tmp_path):
    """data.val_fraction drew the held-out examples by a seeded shuffle of all of them: a record added
    before a resume redrew the split, and the run then evaluated on examples it had trained on, in
    silence; a repeated record fell on both sides (a new-user pass). Each example's side is now decided
    by its own tokens (``fuyou.data.held_out``)."""
    from fuyou.data import tokenize_records

    def examples(ex):
        return {ex.tokens[a:b].tobytes() for a, b in zip(ex.offsets[:-1], ex.offsets[1:])}

    recs = [{"prompt": f"question {i}", "completion": f" answer {i}"} for i in range(300)]
    before = tokenize_records([str(_jsonl(tmp_path / "a.jsonl", recs))], "byte", val_fraction=0.1)
    grown = [{"prompt": f"new question {i}", "completion": f" new {i}"} for i in range(60)]
    after = tokenize_records([str(_jsonl(tmp_path / "b.jsonl", grown[:30] + recs + grown[30:]))], "byte",
                             val_fraction=0.1)
    assert 15 <= len(before.val) <= 45  # about a tenth
    assert examples(before.val) <= examples(after.val) and not examples(after.val) & examples(before.train)
    repeated = tokenize_records([str(_jsonl(tmp_path / "c.jsonl", recs[:40] * 3))], "byte", val_fraction=0.2)
    assert len(repeated.val) and repeated.val.shared_with(repeated.train) == 0
    # at least one example held out, and one trained on, of a few
    few = tokenize_records([str(_jsonl(tmp_path / "d.jsonl", recs[:2]))], "byte", val_fraction=0.01)
    assert (len(few.train), len(few.val)) == (1, 1)
    most = tokenize_records([str(_jsonl(tmp_path / "e.jsonl", recs[:3]))], "byte", val_fraction=0.99)
    assert len(most.train) >= 1 and len(most.val) >= 1


def test_plain_text_held_out_copies_get_a_note_and_an_empty_text_file_is_refused(tmp_path, capsys):
    """A held-out text file that copies a training document passed in silence (only fine-tuning examples
    were compared); an empty .txt file was "1 document" of one token to `fuyou data prepare`, refused only
    when training (a new-user pass)."""
    from fuyou.cli import main

    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(3):
        (docs / f"d{i}.txt").write_text(f"document number {i} " * 30)
    copy = tmp_path / "copy.txt"
    copy.write_text((docs / "d1.txt").read_text())
    assert main(["data", "prepare", str(docs), "--eval", str(copy), "--out", str(tmp_path / "p")]) == 0
    assert "1 of the 1 held-out documents" in capsys.readouterr().err
    own = tmp_path / "own.txt"
    own.write_text("a text of its own " * 20)
    assert main(["data", "prepare", str(docs), "--eval", str(own), "--out", str(tmp_path / "q")]) == 0
    assert "held-out documents" not in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert main(["data", "prepare", str(empty), "--out", str(tmp_path / "r")]) == 2
    assert "holds no text" in capsys.readouterr().err and not (tmp_path / "r" / "meta.json").exists()


def test_a_prepared_directory_among_inputs_is_named_as_such(tmp_path, capsys):
    """A prepared directory given to `fuyou data prepare`, or beside other files in data.path, "held no
    usable files", listed its .bin files as not text (a new-user pass)."""
    from fuyou.cli import main

    recs = _jsonl(tmp_path / "r.jsonl", [{"prompt": f"q {i}", "completion": f" a {i}"} for i in range(10)])
    assert main(["data", "prepare", str(recs), "--out", str(tmp_path / "p")]) == 0
    capsys.readouterr()
    assert main(["data", "prepare", str(tmp_path / "p"), "--out", str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err
    assert "is data `fuyou data prepare` wrote" in err and "not read" not in err
    assert main(["train", "--out", str(tmp_path / "runs"), f'data.path=["{tmp_path / "p"}","{recs}"]',
                 "model.preset=gpt-test", "data.seq_len=32", "train.steps=1"]) == 2
    assert "train on it as the only data.path" in capsys.readouterr().err


def test_a_run_started_before_examples_were_held_out_by_content_resumes_with_its_own_split(tmp_path):
    """Runs started before the held-out examples were chosen by content chose them by a seeded shuffle:
    their resume keeps that choice (else examples they trained on would be held out in silence). A run
    records its choice (data-files.json); one without it is such an earlier run."""
    import numpy as np

    from fuyou.config import load_config
    from fuyou.data import tokenize_records
    from fuyou.train.records import record_data, run_split

    recs = _jsonl(tmp_path / "r.jsonl", [{"prompt": f"q {i}", "completion": f" a {i}"} for i in range(50)])
    cfg = load_config(overrides=[f"data.path={recs}"],
                      flags={"offload.mode": "ssd", "offload.ssd_dirs": [str(tmp_path)]})
    run = tmp_path / "run"
    run.mkdir()
    record_data(run, cfg)
    assert run_split(run) == "content"
    rec = json.loads((run / "data-files.json").read_text())
    del rec["split"]
    (run / "data-files.json").write_text(json.dumps(rec))
    assert run_split(run) == "shuffle" and run_split(tmp_path / "nothing") == "shuffle"
    old = tokenize_records([str(recs)], "byte", val_fraction=0.1, split="shuffle")
    every = tokenize_records([str(recs)], "byte", val_fraction=0.0)
    order = np.random.default_rng(1234).permutation(50)  # fuyou's choice before: the first 5 of this order
    want = {every.train.tokens[every.train.offsets[i]:every.train.offsets[i + 1]].tobytes() for i in order[:5]}
    got = {old.val.tokens[a:b].tobytes() for a, b in zip(old.val.offsets[:-1], old.val.offsets[1:])}
    assert got == want


def test_the_held_out_example_forced_for_a_few_takes_its_repeats_along():
    """With none under the fraction, the lowest example was held out by index: its repeat stayed in training
    (found by review). Forced by content now; all repeats of one example: nothing to hold out."""
    import numpy as np

    from fuyou.data import held_out

    a, b = (np.array([1, 2, 3]), None), (np.array([4, 5]), None)
    for x, y in ((a, b), (b, a)):  # (one of the two has the lowest key: its repeat must go with it)
        out = held_out([x, x, y], 0.01)
        assert out[0] == out[1] and out.count(True) in (1, 2) and not all(out)
    assert held_out([a] * 5, 0.05) == [False] * 5 and held_out([a] * 5, 0.9) == [False] * 5


def _files(d: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(d.iterdir())}


@pytest.mark.parametrize("kind", ["text", "prompt_completion"])
@pytest.mark.parametrize("fault", ["interrupt", "full disk"])
def test_a_prepare_that_stops_while_writing_keeps_the_old_data_whole(tmp_path, monkeypatch, capsys, kind, fault):
    """`data prepare` over prepared data wrote its files in place one by one: a Ctrl-C between two left new tokens
    with old masks and offsets (trained without a word), a full disk destroyed the old data (a pass). The new data
    is written beside it and put in its place whole; a stop or a full disk leaves the old data byte for byte, and
    nothing else behind."""
    import errno

    import fuyou.data.dataset as dataset
    import fuyou.data.examples as examples
    from fuyou.cli import main

    def records(n, rev=False):
        rows = [{"prompt": f"Q{i}?", "completion": f" A{i}."} if kind != "text" else {"text": f"doc {i} " * 5}
                for i in range(n)]
        return rows[::-1] if rev else rows

    out = tmp_path / "prep"
    assert main(["data", "prepare", str(_jsonl(tmp_path / "a.jsonl", records(40))), "--out", str(out)]) == 0
    before = _files(out)
    writer = "write_examples" if kind != "text" else "write_prepared"
    real = getattr(examples if kind != "text" else dataset, writer)

    def stops_midway(d, data, extra=None):
        real(d, data, extra)
        (Path(d) / "meta.json").unlink()  # the files half there, as a stop between two of them leaves them
        if fault == "interrupt":
            raise KeyboardInterrupt
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(examples if kind != "text" else dataset, writer, stops_midway)
    new = str(_jsonl(tmp_path / "b.jsonl", records(60, rev=True)))
    capsys.readouterr()
    if fault == "interrupt":
        assert main(["data", "prepare", new, "--out", str(out)]) == 130
    else:
        assert main(["data", "prepare", new, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert "No space left on device" in err and "its previous data is intact" in err, err
        assert "replaced" not in err
    assert _files(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "b.jsonl", "prep"]  # no leftovers
    monkeypatch.undo()
    assert main(["data", "prepare", new, "--out", str(out)]) == 0
    assert _files(out) != before


def test_a_run_reading_prepared_data_keeps_reading_it_while_it_is_replaced(tmp_path):
    """The files were overwritten under a run that had them mapped: it died of SIGBUS (a pass). The old files
    stay whole under the mapping once the new data takes the directory's place."""
    from fuyou.cli import main

    out = tmp_path / "prep"
    assert main(["data", "prepare", str(_jsonl(tmp_path / "a.jsonl", [{"text": "abc " * 4000}])), "--out",
                 str(out)]) == 0
    mapped = np.memmap(out / "train.bin", dtype=np.uint16, mode="r")
    was = np.array(mapped)
    assert main(["data", "prepare", str(_jsonl(tmp_path / "b.jsonl", [{"text": "x"}])), "--out", str(out)]) == 0
    assert np.array_equal(np.array(mapped), was)  # (a shortened file under the mapping is a SIGBUS)
    assert (out / "train.bin").stat().st_size < was.nbytes


@pytest.mark.parametrize("edit", [{"info": [1]}, {"val_fraction": "x"}, {"train_tokens": -3}, {"dtype": 5}, None])
def test_an_edited_or_truncated_meta_json_is_named(tmp_path, edit):
    """An edited meta.json ("info": [1]) was an AttributeError traceback, a string val_fraction went into the run's
    config.toml, and a truncated one made the directory "hold no usable files" (a pass): each is a DataError that
    names meta.json."""
    from fuyou.cli import main

    out = tmp_path / "prep"
    rows = [{"prompt": f"Q{i}?", "completion": f" A{i}."} for i in range(20)]
    assert main(["data", "prepare", str(_jsonl(tmp_path / "a.jsonl", rows)), "--out", str(out)]) == 0
    meta = json.loads((out / "meta.json").read_text())
    (out / "meta.json").write_text(json.dumps({**meta, **edit}) if edit else json.dumps(meta)[:20])
    with pytest.raises(DataError, match="meta.json is malformed"):
        load_data(DataConfig(path=[str(out)]))


def test_examples_with_nothing_to_learn_are_refused_when_prepared(tmp_path, capsys):
    """Empty prompts and completions were prepared ("0.0% of targets carry loss") and refused only by train."""
    from fuyou.cli import main

    rows = [{"prompt": "", "completion": ""}] * 3
    assert main(["data", "prepare", str(_jsonl(tmp_path / "e.jsonl", rows)), "--out", str(tmp_path / "p")]) == 2
    assert "no training example has a token to learn" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


def test_replacing_prepared_data_through_a_link_in_the_current_directory_and_after_a_kill(tmp_path, monkeypatch,
                                                                                          capsys):
    """The review of the atomic replacement: a link to the data directory was itself replaced (the data landed
    beside it and a link to the old data stayed for good), a setgid group directory came back 0755, `--out .`
    failed (the current directory cannot be renamed), and a kill between the two renames lost both."""
    import os

    from fuyou.cli import main
    from fuyou.data.dataset import sweep_leftovers

    src = _jsonl(tmp_path / "a.jsonl", [{"text": "some text " * 30}])
    target = tmp_path / "big" / "data"
    target.mkdir(parents=True)
    os.chmod(target, 0o2770)
    (tmp_path / "link").symlink_to(target)
    for _ in range(2):
        assert main(["data", "prepare", str(src), "--out", str(tmp_path / "link")]) == 0
    assert (tmp_path / "link").is_symlink() and (target / "meta.json").is_file()
    assert oct(target.stat().st_mode & 0o7777) == oct(0o2770)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "big", "link"]
    assert sorted(p.name for p in target.parent.iterdir()) == ["data"]
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    for _ in range(2):
        assert main(["data", "prepare", str(src), "--out", "."]) == 0
    assert sorted(p.name for p in here.iterdir()) == ["meta.json", "train.bin", "val.bin"]
    # killed between the renames: the old directory moved aside, the new not yet in place; the next call puts it back
    before = _files(target)
    dead = 2**22 + 12345  # (beyond pid_max's default: no such process)
    target.rename(target.parent / f".data.old-{dead}-abcd")
    (target.parent / f".data.prepare-{dead}-abcd").mkdir()
    # a run started meanwhile is told where its data is (it said only "does not exist")
    assert main(["train", "--out", str(tmp_path / "runs"), "model.preset=gpt-tiny", f"data.path={target}",
                 "data.source=prepared", "train.steps=1"]) == 2
    assert f"is in {target.parent / f'.data.old-{dead}-abcd'}; put it back with `mv " in capsys.readouterr().err
    sweep_leftovers(target.parent, "data", quiet_s=0)
    assert sorted(p.name for p in target.parent.iterdir()) == ["data"] and _files(target) == before


def test_replacing_prepared_data_keeps_other_files_and_a_setgid_group(tmp_path):
    """The hostile pass on the replacement: other files in --out (notes, the raw input itself) went with the old
    directory, and files made before the new directory took a setgid directory's group were not the group's."""
    import grp
    import os

    from fuyou.cli import main

    out = tmp_path / "D"
    src = _jsonl(tmp_path / "a.jsonl", [{"text": "some text " * 30}])
    assert main(["data", "prepare", str(src), "--out", str(out)]) == 0
    (out / "NOTES.txt").write_text("mine")
    (out / "raw").mkdir()
    assert main(["data", "prepare", str(src), "--out", str(out)]) == 0
    assert (out / "NOTES.txt").read_text() == "mine" and (out / "raw").is_dir()
    other = next((g.gr_gid for g in grp.getgrall() if g.gr_gid != os.getgid()), None)
    if other is None or os.geteuid() != 0:
        return  # (no other group to give it here)
    shared = tmp_path / "S"
    shared.mkdir()
    os.chown(shared, -1, other)
    os.chmod(shared, 0o2750)
    for _ in range(2):
        assert main(["data", "prepare", str(src), "--out", str(shared)]) == 0
    assert shared.stat().st_gid == other and all(f.stat().st_gid == other for f in shared.iterdir())


def test_a_signal_during_the_swap_is_handled_after_it():
    """Blocking SIGINT in the main thread did not hold it off (another thread took it, a pass): the swap's signals
    are deferred by handlers, and delivered once the renames are done."""
    import os
    import signal
    import threading

    from fuyou.data.dataset import _signals_deferred

    done = []
    with pytest.raises(KeyboardInterrupt):
        with _signals_deferred():
            t = threading.Thread(target=os.kill, args=(os.getpid(), signal.SIGINT))
            t.start()
            t.join()
            for _ in range(1000):  # the handler runs between bytecodes: it has had its chance
                pass
            done.append(True)  # (the "second rename": reached)
    assert done == [True]


@pytest.mark.parametrize("kind", ["examples", "text"])
def test_data_prepared_again_with_another_split_or_masks_under_a_run_is_refused_on_resume(tmp_path, capsys, kind):
    """A run's prepared data prepared again at the same place with another --val-fraction (or with
    --train-on-prompt) resumed with "the data changed" only: four of seven new held-out examples had been
    trained on, and the loss masks changed mid-run, where the same change given as data.val_fraction or
    data.train_on_prompt is refused. Prepared again as it was, the resume goes on."""
    from fuyou.cli import main

    if kind == "examples":
        src = _jsonl(tmp_path / "r.jsonl",
                     [{"prompt": f"question {i} ", "completion": f"answer {i}", "text": f"question {i} answer {i}"}
                      for i in range(60)])
    else:
        src = tmp_path / "t.txt"
        src.write_text("".join(f"line {i} of a plain text corpus.\n" for i in range(400)))
    data, ssd = tmp_path / "data", tmp_path / "ssd"
    ssd.mkdir()
    assert main(["data", "prepare", str(src), "--out", str(data), "--val-fraction", "0.1"]) == 0
    run = tmp_path / "runs" / "p"
    assert main(["train", "--offload", "ssd", "--ssd", str(ssd), "--out", str(tmp_path / "runs"), "run.name=p",
                 "model.preset=gpt-test", "data.seq_len=32", f"data.path={data}", "train.steps=2",
                 "train.eval_every=0", "run.save_weights=false", "offload.keep_state=true"]) == 0
    (tmp_path / "held.txt").write_text("".join(f"held line {i}.\n" for i in range(50)))
    held = _jsonl(tmp_path / "held.jsonl", [{"prompt": f"held {i} ", "completion": "x"} for i in range(9)])
    eval_file = held if kind == "examples" else tmp_path / "held.txt"
    changes = [["--val-fraction", "0.3"], ["--eval", str(eval_file)]]
    if kind == "examples":
        changes += [["--val-fraction", "0.1", "--train-on-prompt"], ["--val-fraction", "0.1", "--format", "text"]]
    for change in changes:
        assert main(["data", "prepare", str(src), "--out", str(data), *change]) == 0
        capsys.readouterr()
        assert main(["train", "--resume", str(run), "train.steps=3"]) == 2
        err = capsys.readouterr().err
        said = " ".join(change).replace(str(eval_file), str(eval_file.resolve())).replace(" --format text", "")
        assert f"was prepared again with {said} where this run started on data prepared with " \
               f"--val-fraction 0.1" in err, err
        held_changed = "--train-on-prompt" not in change and "text" not in change
        assert ("could be ones the run trained on" in err) == held_changed, err
        assert f"held-out {'examples' if kind == 'examples' else 'tokens'} could" in err or not held_changed
        assert ("the tokens that carry loss changed" in err) == ("--train-on-prompt" in change), err
        assert ("its fine-tuning examples became plain text" in err) == ("text" in change), err
        assert f"--out {data} --val-fraction 0.1" + (" --format auto`" if "text" in change else "`") in err
    # held-out files of its own, then others: the files are compared by content and named
    assert main(["data", "prepare", str(src), "--out", str(data), "--eval", str(eval_file)]) == 0
    assert main(["train", "--out", str(tmp_path / "runs"), "--offload", "ssd", "--ssd", str(ssd), "run.name=q",
                 "model.preset=gpt-test", "data.seq_len=32", f"data.path={data}", "train.steps=2",
                 "train.eval_every=0", "run.save_weights=false", "offload.keep_state=true"]) == 0
    copy = tmp_path / "elsewhere" / eval_file.name
    copy.parent.mkdir()
    copy.write_bytes(eval_file.read_bytes())  # the same files at another place: the same held-out data
    assert main(["data", "prepare", str(src), "--out", str(data), "--eval", str(copy)]) == 0
    assert main(["train", "--resume", str(tmp_path / "runs" / "q"), "train.steps=3", "offload.keep_state=true"]) == 0
    other = tmp_path / ("other.jsonl" if kind == "examples" else "other.txt")
    other.write_bytes(eval_file.read_bytes().replace(b"held", b"kept"))
    assert main(["data", "prepare", str(src), "--out", str(data), "--eval", str(other)]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(tmp_path / "runs" / "q"), "train.steps=4"]) == 2
    err = capsys.readouterr().err
    assert f"prepared again with --eval {other.resolve()} where this run started on data prepared with --eval " \
           f"{copy.resolve()}" in err and f"--out {data} --eval {copy.resolve()}`" in err, err
    assert main(["data", "prepare", str(src), "--out", str(data), "--val-fraction", "0.1"]) == 0
    assert main(["train", "--resume", str(run), "train.steps=3"]) == 0


def test_documents_and_examples_are_held_in_their_stored_width_and_joined_without_copies():
    """`fuyou data prepare` held every document as int64 and joined them through two more int64 copies: 78 MB
    of text peaked at 1.6 GB (20 bytes a token; now 0.53 GB, the same files). The stream is the same as the
    plain concatenation in the seeded order, 32-bit ids among 16-bit ones included."""
    from fuyou.data.dataset import join_tokens
    from fuyou.data.examples import Examples
    from fuyou.data.tokenizer import compact_ids

    rng = np.random.default_rng(0)
    docs = [compact_ids(rng.integers(0, 300, size=int(rng.integers(0, 50)))) for i in range(9)]
    docs[3] = compact_ids(np.array([5, 69999, 7]))
    assert {d.dtype for d in docs} == {np.dtype(np.uint16), np.dtype(np.uint32)}
    order = np.random.default_rng(1234).permutation(len(docs))
    want = np.concatenate([np.concatenate([docs[i].astype(np.int64), [2]]) for i in order])
    got = join_tokens(docs, 2, 300)
    assert got.dtype == np.uint32 and np.array_equal(got.astype(np.int64), want)
    small = join_tokens([d for i, d in enumerate(docs) if i != 3], 2, 300)
    assert small.dtype == np.uint16 and np.array_equal(join_tokens([], 2, 300), [2])
    ex = Examples.from_arrays([(d, (d % 2).astype(np.uint8)) for d in docs], np.dtype(np.uint32))
    assert np.array_equal(ex.tokens.astype(np.int64), np.concatenate([d.astype(np.int64) for d in docs]))
    assert np.array_equal(ex.loss, np.concatenate([d % 2 for d in docs]).astype(np.uint8))
    assert ex.offsets[-1] == len(ex.tokens) and len(ex) == len(docs)


def test_inputs_a_prepare_used_to_pass_over_in_silence(tmp_path, capsys):
    """From a hostile pass of `fuyou data prepare`: a link to nothing in an input directory, empty documents
    beside others, a record of two formats, and --val-fraction given beside --eval were all taken without a
    word (the link left out, the empties one end-of-document token each, the text field unused, the share
    dropped)."""
    from fuyou.cli import main

    d = tmp_path / "texts"
    d.mkdir()
    (d / "a.txt").write_text("some words " * 20)
    (d / "empty.txt").write_text("")
    (d / "gone.txt").symlink_to(tmp_path / "nowhere.txt")
    data = tokenize_records([d], "byte", val_fraction=0.1)
    err = capsys.readouterr().err
    assert "gone.txt (a link to nothing: its target is gone)" in err
    assert f"1 of the 2 documents are empty ({d / 'empty.txt'}): each adds an end-of-document token alone" in err
    for k in range(5):
        (d / f"e{k}.txt").write_text("")
    tokenize_records([d], "byte", val_fraction=0.1)
    assert f"6 of the 7 documents are empty ({d / 'e0.txt'}, {d / 'e1.txt'}, {d / 'e2.txt'}, ...)" in \
        capsys.readouterr().err
    assert data.documents == 2
    both = _jsonl(tmp_path / "both.jsonl", [{"prompt": "q", "completion": " a", "text": "other"}] * 3)
    tokenize_records([both], "byte", val_fraction=0.0)
    assert "is prompt_completion data and has a 'text' field too" in capsys.readouterr().err
    assert main(["data", "prepare", str(d), "--out", str(tmp_path / "p"), "--eval", str(d / "a.txt"),
                 "--val-fraction", "0.2"]) == 2
    assert "--val-fraction and --eval both choose the held-out data" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


def test_a_long_document_is_encoded_in_pieces_with_the_same_ids(tmp_path, monkeypatch):
    """A 60 MB text file is one document: a Hugging Face tokenizer encoding it whole held 155 bytes a
    character (9.3 GB; a pass). It is encoded in pieces cut after line breaks, each boundary checked to
    encode apart as together, with the whole document's ids; a tokenizer that marks the start of every
    encoding (SentencePiece's word prefix) fails that check and gets the document whole."""
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from fuyou.data.tokenizer import HFTokenizer

    sys.path.insert(0, str(Path(__file__).parents[2] / "tools"))
    from make_tiny_checkpoint import make_tokenizer

    make_tokenizer("llama3.1", tmp_path / "bpe")
    lines = [f"Line {i}: the quick brown fox {'jumps' if i % 3 else 'sleeps'} over {i * 7} lazy dogs.\n"
             + ("\n  indented, after a blank line\n" if i % 11 == 0 else "") for i in range(400)]
    text = "".join(lines)
    monkeypatch.setattr(HFTokenizer, "PIECE", 500)
    tok = HFTokenizer(tmp_path / "bpe")
    cuts = tok._cuts(text)
    assert len(cuts) > 10 and all(text[c - 1] == "\n" and not text[c].isspace() for c in cuts)
    assert tok.encode_np(text).tolist() == tok.encode(text)
    sp = Tokenizer(models.BPE(unk_token="<unk>"))
    sp.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always")
    sp.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "</s>"],
                                                      show_progress=False))
    PreTrainedTokenizerFast(tokenizer_object=sp, eos_token="</s>").save_pretrained(tmp_path / "sp")
    spt = HFTokenizer(tmp_path / "sp")
    assert spt._cuts(text) == [] and spt.encode_np(text).tolist() == spt.encode(text)
    # no pre-tokenizer: the document is one word, whose merges may cross any cut (a review: "\nb" merged)
    raw = Tokenizer(models.BPE(vocab={"a": 0, "\n": 1, "b": 2, "c": 3, "aa": 4, "a\n": 5, "\nb": 6, "</s>": 7},
                               merges=[("a", "a"), ("a", "\n"), ("\n", "b")]))
    PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="</s>").save_pretrained(tmp_path / "raw")
    rawt = HFTokenizer(tmp_path / "raw")
    odd = "c" * 700 + "a" * 400 + "\nb" + "c" * 3000
    assert rawt._cuts(odd) == [] and rawt.encode_np(odd).tolist() == rawt.encode(odd)
    # a word starts after each line break, but a piece encoded alone gets a space in front (ByteLevel's
    # add_prefix_space: "Line" alone is "ĠLine"): only the boundary's own encoding check sees it (an audit)
    bl = Tokenizer(models.BPE())
    bl.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    bl.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=400, special_tokens=["</s>"], show_progress=False,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=bl, eos_token="</s>").save_pretrained(tmp_path / "bl")
    blt = HFTokenizer(tmp_path / "bl")
    window = lines[1] + lines[2]
    assert len(lines[1]) in {a for _, (a, _) in blt._tok.backend_tokenizer.pre_tokenizer.pre_tokenize_str(window)}
    assert blt._cuts(text) == [] and blt.encode_np(text).tolist() == blt.encode(text)


def test_prepared_data_prepared_again_the_same_is_not_data_that_changed(tmp_path, capsys):
    """A run's prepared data prepared again from the same files with the same settings is the same data,
    byte for byte: its resume said the data changed (the files' times had) and that the rows' order was
    drawn anew (a hostile pass). Prepared data is compared by a digest of its contents; other data still
    tells a change."""
    from fuyou.cli import main

    src = _jsonl(tmp_path / "r.jsonl", [{"prompt": f"question {i} ", "completion": f"answer {i}"} for i in range(60)])
    data, ssd = tmp_path / "data", tmp_path / "ssd"
    ssd.mkdir()
    assert main(["data", "prepare", str(src), "--out", str(data)]) == 0
    run = tmp_path / "runs" / "p"
    assert main(["train", "--offload", "ssd", "--ssd", str(ssd), "--out", str(tmp_path / "runs"), "run.name=p",
                 "model.preset=gpt-test", "data.seq_len=32", f"data.path={data}", "train.steps=2",
                 "train.eval_every=0", "run.save_weights=false", "offload.keep_state=true"]) == 0
    record = json.loads((run / "data-files.json").read_text())
    assert record["files"][0][2].startswith("sha256:")
    # a run recorded before the digest (the newest time) resumes over unchanged data without a change
    record["files"][0][2] = max(f.stat().st_mtime_ns for f in data.iterdir())
    (run / "data-files.json").write_text(json.dumps(record))
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "train.steps=2"]) == 0
    assert "the data changed" not in capsys.readouterr().err
    assert isinstance(json.loads((run / "data-files.json").read_text())["files"][0][2], int)
    record["files"][0] = json.loads((run / "data-files.json").read_text())["files"][0][:2] + ["sha256:x"]
    (run / "data-files.json").write_text(json.dumps(record))  # (as a run started now records it)
    assert main(["data", "prepare", str(src), "--out", str(data)]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "train.steps=3", "offload.keep_state=true"]) == 0
    err = capsys.readouterr().err
    assert "the data changed" in err  # ("sha256:x" is no digest of it)
    assert main(["data", "prepare", str(src), "--out", str(data)]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "train.steps=3", "offload.keep_state=true"]) == 0
    assert "the data changed" not in capsys.readouterr().err
    leftover = data / ".data.prepare-999-x"  # a killed prepare's: not the data (a review)
    leftover.mkdir()
    (leftover / "train.bin").write_bytes(b"partial")
    (data / "notes.txt").write_text("mine")
    assert main(["train", "--resume", str(run), "train.steps=3", "offload.keep_state=true"]) == 0
    assert "the data changed" not in capsys.readouterr().err
    _jsonl(src, [{"prompt": f"question {i} ", "completion": f"reply! {i}"} for i in range(60)])  # the same size
    assert main(["data", "prepare", str(src), "--out", str(data)]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "train.steps=4"]) == 0
    err = capsys.readouterr().err
    assert "the data changed since the run started" in err and ", content " in err, err


def test_a_test_split_in_a_dataset_folder_and_a_large_held_out_share_are_said(tmp_path, capsys):
    """A pass: a dataset folder's test.jsonl was trained on in silence (and a random 5% held out instead), and
    a file of 2-5 examples lost a third or half of them to the held-out set without a word."""
    from fuyou.cli import main

    folder = tmp_path / "dset"
    folder.mkdir()
    for name, n in (("train.jsonl", 20), ("test.jsonl", 5)):
        (folder / name).write_text("".join(json.dumps({"prompt": f"{name} q{i}", "completion": f" a{i}"}) + "\n"
                                           for i in range(n)))
    assert main(["data", "prepare", str(folder), "--out", str(tmp_path / "p1")]) == 0
    err = capsys.readouterr().err
    assert f"note: {folder / 'test.jsonl'} is named as a held-out split, and is trained on" in err
    assert "train.jsonl is named" not in err
    held = tmp_path / "held"  # (the held-out files themselves, --eval: not said to be trained on, a review)
    held.mkdir()
    (held / "test.jsonl").write_text((folder / "test.jsonl").read_text())
    assert main(["data", "prepare", str(folder / "train.jsonl"), "--eval", str(held), "--out",
                 str(tmp_path / "p0")]) == 0
    assert "is named as a held-out split" not in capsys.readouterr().err
    three = tmp_path / "three.jsonl"
    three.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": f" a{i}"}) + "\n" for i in range(3)))
    assert main(["data", "prepare", str(three), "--out", str(tmp_path / "p2")]) == 0
    assert "1 of the 3 examples is held out for evaluation (33%" in capsys.readouterr().err
    assert main(["data", "prepare", str(folder / "train.jsonl"), "--out", str(tmp_path / "p3")]) == 0
    assert "held out for evaluation" not in capsys.readouterr().err  # (20 examples: the share asked for)


def test_inputs_a_data_pass_found_2026_12_08(tmp_path, capsys):
    """JSON the parser fails on other than by syntax, a broken array's own error, an example object with a list
    field, held-out files with nothing to evaluate, and files of prepared data given in its place."""
    deep = tmp_path / "deep.jsonl"
    deep.write_text('{"prompt": "a", "completion": "b", "x": ' + "[" * 1000 + "]" * 1000 + "}\n")
    with pytest.raises(DataError, match="deep.jsonl:1: nested too deeply to parse"):  # (a RecursionError traceback)
        tokenize_records([deep], "byte")
    big = tmp_path / "big.json"
    big.write_text('[{"prompt": "a", "completion": "b", "id": ' + "7" * 5000 + "}]")
    with pytest.raises(DataError, match=r"big.json: cannot be parsed \(Exceeds the limit \(4300 digits\).*\); remove"):
        tokenize_records([big], "byte")  # (a ValueError traceback)
    arr = tmp_path / "a.json"  # a trailing comma at line 4 was "a.json:1: ... each line must be one JSON object"
    arr.write_text('[\n  {"prompt": "q", "completion": "a"},\n  {"prompt": "r", "completion": "b"},\n]\n')
    with pytest.raises(DataError, match=r"a.json:4:1: not valid JSON \(Expecting value\) in the array the file holds$"):
        tokenize_records([arr], "byte")
    arr.write_text('[\n  {"prompt": "q", "completion": "a"},\n  {"prompt": "r", "compl')
    with pytest.raises(DataError, match="a.json:3:.*the file ends before the array does: it may be cut short"):
        tokenize_records([arr], "byte")
    one = tmp_path / "one.json"  # an example with a list of its own was taken for a wrapper of that list
    one.write_text('{"prompt": "2+2=", "completion": " 4", "tags": ["math"]}')
    assert tokenize_records([one], "byte").info["records"] == 1
    one.write_text('{"text": "QA pairs", "data": [{"prompt": "q", "completion": "a"}]}')  # a wrapper, refused as before
    with pytest.raises(DataError, match=r"give the array inside it \('data'\) as its own file"):
        tokenize_records([one], "byte")
    train = _jsonl(tmp_path / "t.jsonl", [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(4)])
    for name, body in (("e.jsonl", ""), ("b.jsonl", "\n\n"), ("n.jsonl", '{"messages": [{"role": "user", "content": '
                                                                          '"hi"}]}\n')):
        (tmp_path / name).write_text(body)  # (prepared as "0 held-out examples": evaluation off, in silence)
        with pytest.raises(DataError, match=f"{name} holds no example to evaluate on"):
            tokenize_records([train], "byte", eval_paths=[tmp_path / name])
    (tmp_path / "e.txt").write_text("")
    (tmp_path / "d.txt").write_text("some text")
    with pytest.raises(DataError, match="e.txt holds no text to evaluate on"):
        tokenize_records([tmp_path / "d.txt"], "byte", eval_paths=[tmp_path / "e.txt"])
    wizard = _jsonl(tmp_path / "w.jsonl", [{"messages": [{"role": "wizard", "content": "hi"},
                                                         {"role": "assistant", "content": "a"}]}])
    capsys.readouterr()
    tokenize_records([wizard], "byte", train_on_prompt=True, val_fraction=0)
    assert "are prompt, with loss as all prompt (data.train_on_prompt): 'wizard'" in capsys.readouterr().err
    write_examples(tmp_path / "p", tokenize_records([train], "byte", val_fraction=0))
    for f in ("train.bin", "meta.json"):  # (".bin ... is not text"; "a record with keys ... is none of the formats")
        with pytest.raises(DataError, match=f"p/{f} is a file of the data `fuyou data prepare` wrote in .*/p: give"):
            tokenize_records([tmp_path / "p" / f], "byte")
    # the user's own data beside prepared data (`fuyou data prepare ... --out .`) is data (the review of the fix)
    mine = _jsonl(tmp_path / "p" / "mine.jsonl", [{"prompt": "q", "completion": "a"}])
    assert tokenize_records([mine], "byte", val_fraction=0).info["records"] == 1
    mine.unlink()
    (tmp_path / "p" / "meta.json").unlink()  # ("holds no usable files")
    with pytest.raises(DataError, match="looks like data `fuyou data prepare` wrote, but its meta.json is missing"):
        tokenize_records([tmp_path / "p"], "byte")
    nano = tmp_path / "shakespeare"  # nanoGPT's data directory: train.bin and val.bin beside the text: the text is read
    nano.mkdir()
    for name in ("train.bin", "val.bin"):
        (nano / name).write_bytes(b"\0" * 64)
    (nano / "input.txt").write_text("to be or not to be")
    assert tokenize_records([nano], "byte", val_fraction=0).documents == 1


def test_held_out_files_of_prepared_data_take_the_models_tokenizer_when_its_own_is_gone(tmp_path, big_vocab):
    """The refusal advised model.init_from, which was never tried (a pass)."""
    import shutil

    tok = tmp_path / "tokB"
    shutil.copytree(big_vocab, tok)
    train = _jsonl(tmp_path / "train.jsonl", [{"prompt": "w1", "completion": f"w{i} w{i + 1}"} for i in range(20)])
    held = _jsonl(tmp_path / "held.jsonl", [{"prompt": "w1", "completion": "w7 w8"}])
    write_examples(tmp_path / "p", tokenize_records([train], str(tok), val_fraction=0))
    shutil.rmtree(tok)
    cfg = DataConfig(path=[str(tmp_path / "p")], eval_path=[str(held)])
    assert len(load_data(cfg, model_tokenizer=str(big_vocab)).val) == 1
    from fuyou.data import _eval_tokenizer  # the data's own tokenizer first, where it is there (a review: the
    data = read_data(tmp_path / "p")        # model's, of the same vocabulary, may render another chat template)
    shutil.copytree(big_vocab, tok)
    assert _eval_tokenizer(data, None, "auto", model=str(big_vocab)) == str(tok)
