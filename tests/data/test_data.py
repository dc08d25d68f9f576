import json

import numpy as np
import pytest
import torch

from fuyou.data import BatchSampler, DataConfig, EvalBatches, SyntheticBatches, load_data
from fuyou.data.dataset import read_prepared
from fuyou.errors import DataError
from fuyou.cli import main


def test_builtin_corpus_is_real_text():
    d = load_data(DataConfig())
    assert len(d.train) > 400_000 and len(d.val) > 10_000
    assert d.vocab_size == 257 and d.train.max() <= 256
    text = bytes(int(t) for t in d.train[:2000] if t < 256).decode("utf-8", "replace")
    assert sum(c.isalpha() for c in text) > 1000


def test_batches_are_a_function_of_the_index():
    d = load_data(DataConfig())
    s = BatchSampler(d.train, 32, 4, seed=1)
    x1, y1, _ = s.batch(5)
    s.batch(0)
    x2, y2, _ = s.batch(5)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert torch.equal(x1[:, 1:], y1[:, :-1])
    assert not torch.equal(s.batch(6)[0], x1)
    e = list(EvalBatches(d.val, 32, 4, 3))
    assert len(e) == 3 and e[0][0].shape == (4, 32)
    sx, sy, _ = SyntheticBatches(320, 16, 2, 0).batch(3)
    assert sx.shape == (2, 16) and int(sx.max()) < 320


def test_prepare_text_and_jsonl(tmp_path, capsys):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("hello world " * 200)
    (tmp_path / "docs" / "b.jsonl").write_text("\n".join(json.dumps({"text": f"doc {i} " * 50}) for i in range(20)))
    out = tmp_path / "prepared"
    assert main(["data", "prepare", str(tmp_path / "docs"), "--out", str(out)]) == 0
    d = read_prepared(out)
    assert d.train.dtype == np.uint16 and len(d.train) + len(d.val) > 2400 + 20 * 300
    d2 = load_data(DataConfig(source="prepared", path=[str(out)]))
    assert np.array_equal(np.asarray(d2.val), np.asarray(d.val))
    d3 = load_data(DataConfig(source="text", path=[str(tmp_path / "docs")]))
    assert np.array_equal(d3.train, np.asarray(d.train))


def test_prepared_truncated_file_is_reported(tmp_path):
    (tmp_path / "t.txt").write_text("some text " * 500)
    out = tmp_path / "p"
    main(["data", "prepare", str(tmp_path / "t.txt"), "--out", str(out)])
    with open(out / "train.bin", "r+b") as fh:
        fh.truncate(100)
    with pytest.raises(DataError, match="truncated"):
        read_prepared(out)


def test_bad_jsonl_line_names_the_line(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(DataError, match=r"x.jsonl:2"):
        load_data(DataConfig(source="text", path=[str(f)]))


def test_too_short_data_is_refused(tmp_path):
    f = tmp_path / "tiny.txt"
    f.write_text("ab")
    d = load_data(DataConfig(source="text", path=[str(f)]))
    with pytest.raises(DataError, match="fewer than one sequence"):
        d.check_fits(128, 320)


def test_windows_reach_the_last_token_and_data_one_window_long_trains():
    """A window may start at the last place one fits (len - seq_len - 1), and data exactly one window long
    gives that window; the held-out share is the joined tokens' tail, nothing shared or lost (a mutation audit:
    the last window never drawn, and a token in both splits, passed)."""
    from fuyou.data.dataset import join_tokens, split_tokens

    tokens = np.arange(11, dtype=np.uint16)  # seq_len 8: windows start at 0, 1 or 2
    s = BatchSampler(tokens, 8, 4, seed=0)
    starts = {int(s.batch(i).tokens[j, 0]) for i in range(30) for j in range(4)}
    assert starts == {0, 1, 2}
    one = BatchSampler(np.arange(9, dtype=np.uint16), 8, 2, seed=0).batch(0)
    assert one.tokens[0].tolist() == list(range(8)) and one.targets[0].tolist() == list(range(1, 9))
    docs = [np.arange(1, 40, dtype=np.uint16), np.arange(5, 90, dtype=np.uint16)]
    joined = join_tokens(docs, 0, 100, 1234)
    train, val = split_tokens(docs, 0, 100, 0.1, 1234)
    assert len(train) + len(val) == len(joined) and len(val) == int(len(joined) * 0.1)
    assert np.array_equal(np.concatenate([train, val]), joined)


def test_the_data_fingerprint_the_ranks_compare_covers_the_held_out_split():
    """Data-parallel ranks compare content_fingerprint: ranks whose held-out tokens differ evaluate different
    data, as ranks with different training tokens train on it; both are seen (a fingerprint of the training split
    alone passed every test: a mutation audit)."""
    from fuyou.data.dataset import TokenData, content_fingerprint

    rng = np.random.default_rng(0)
    train, val = rng.integers(0, 300, 50_000).astype(np.uint16), rng.integers(0, 300, 5_000).astype(np.uint16)
    base = content_fingerprint(TokenData(train, val, 320, 0, "byte"))
    other_val, other_train = val.copy(), train.copy()
    other_val[0] ^= 1
    other_train[0] ^= 1
    assert content_fingerprint(TokenData(train, other_val, 320, 0, "byte")) != base
    assert content_fingerprint(TokenData(other_train, val, 320, 0, "byte")) != base
    assert content_fingerprint(TokenData(train.copy(), val.copy(), 320, 0, "byte")) == base
