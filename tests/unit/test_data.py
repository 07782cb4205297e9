"""Tests of control/data.py: the Rotten Tomatoes loader, split, tokenizer and batch format."""

from __future__ import annotations

import numpy as np
import pytest

from compiler.hf import default_model_dir
from control.data import (
    Batch,
    Tokenizer,
    iterate_batches,
    load_batch,
    load_rotten_tomatoes,
    save_batch,
    split,
    validate_batch,
)
from edgert.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def rt():
    return load_rotten_tomatoes()


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(default_model_dir())


def test_rotten_tomatoes(rt):
    texts, labels = rt
    assert 10_500 <= len(texts) < 10_600 and len(texts) == 10_568
    assert labels.dtype == np.int64 and set(np.unique(labels)) == {0, 1}
    assert int(labels.sum()) == 5242
    assert texts[0].startswith("The Rock is destined")


def test_missing_dataset_file(tmp_path):
    with pytest.raises(DataError, match="scripts/setup.sh"):
        load_rotten_tomatoes(tmp_path / "missing.txt")


def test_split_is_deterministic_and_stratified(rt):
    texts, labels = rt
    a = split(texts, labels, 0.1, seed=3)
    b = split(texts, labels, 0.1, seed=3)
    c = split(texts, labels, 0.1, seed=4)
    assert a[2] == b[2] and a[2] != c[2]
    assert len(a[0]) + len(a[2]) == len(texts)
    assert abs(len(a[2]) - 1057) <= 1
    assert abs(a[3].mean() - labels.mean()) < 0.01
    assert not set(a[0]) & set(a[2]) or len(set(texts)) < len(texts)
    with pytest.raises(ConfigError):
        split(texts, labels, 1.5, seed=0)


def test_tokenizer_pads_to_fixed_length(tok):
    enc = tok.encode(["hi", "a much longer sentence " * 30], max_len=32)
    for k in ("input_ids", "attention_mask", "token_type_ids"):
        assert enc[k].shape == (2, 32) and enc[k].dtype == np.int64
    assert enc["input_ids"][0, :3].tolist() == [101, 7632, 102]  # [CLS] hi [SEP]
    assert enc["attention_mask"][0].sum() == 3 and not enc["input_ids"][0, 3:].any()
    assert (
        enc["attention_mask"][1].all() and enc["input_ids"][1, -1] == 102
    )  # truncated, ends [SEP]
    # the file's own Fixed(128) padding must not leak into other lengths
    assert tok.encode(["hi"], max_len=8)["input_ids"].shape == (1, 8)
    with pytest.raises(DataError, match="list of strings"):
        tok.encode("hi", max_len=8)


def _batch(b=4, t=16) -> dict:
    return {
        "input_ids": np.ones((b, t), np.int64),
        "attention_mask": np.ones((b, t), np.int64),
        "labels": np.zeros(b, np.int64),
    }


def test_batch_roundtrip(tmp_path):
    p = save_batch(tmp_path / "b.npz", _batch())
    b = load_batch(p, batch_size=4, seq_len=16)
    assert isinstance(b, Batch) and (b.batch_size, b.seq_len) == (4, 16)
    assert not b.token_type_ids.any() and b.token_type_ids.dtype == np.int64


def test_batch_validation_errors(tmp_path):
    d = _batch()
    del d["labels"]
    with pytest.raises(DataError, match="missing key 'labels'"):
        validate_batch(d)
    d = _batch()
    d["input_ids"] = d["input_ids"].astype(np.int32)
    with pytest.raises(DataError, match="'input_ids' has dtype int32, expected int64"):
        validate_batch(d)
    with pytest.raises(DataError, match=r"\(4, 16\), expected \(4, 128\).*--seq-len 128"):
        validate_batch(_batch(), seq_len=128)
    with pytest.raises(
        DataError, match=r"'input_ids' has shape.*expected \(8, 16\).*--batch-size 8"
    ):
        validate_batch(_batch(), batch_size=8)
    np.savez(tmp_path / "x.npz", **_batch(t=8))
    with pytest.raises(DataError, match="x.npz.*--seq-len 16"):
        load_batch(tmp_path / "x.npz", seq_len=16)
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not a readable"):
        load_batch(tmp_path / "bad.npz")


def test_iterate_batches_deterministic_and_resumable():
    n, t = 23, 8
    enc = {
        "input_ids": np.arange(n * t, dtype=np.int64).reshape(n, t) + 1,
        "attention_mask": np.ones((n, t), np.int64),
        "token_type_ids": np.zeros((n, t), np.int64),
    }
    labels = np.arange(n, dtype=np.int64)
    full = list(iterate_batches(enc, labels, 5, seed=1, epoch=0))
    assert [p for p, _ in full] == [0, 1, 2, 3]  # 23 // 5, last partial batch dropped
    again = list(iterate_batches(enc, labels, 5, seed=1, epoch=0))
    assert all((a.labels == b.labels).all() for (_, a), (_, b) in zip(full, again, strict=False))
    resumed = list(iterate_batches(enc, labels, 5, seed=1, epoch=0, start=2))
    assert [p for p, _ in resumed] == [2, 3]
    assert (resumed[0][1].labels == full[2][1].labels).all()
    other = list(iterate_batches(enc, labels, 5, seed=1, epoch=1))
    assert any((a.labels != b.labels).any() for (_, a), (_, b) in zip(full, other, strict=False))
    seen = np.concatenate([b.labels for _, b in full])
    assert len(set(seen.tolist())) == 20
    assert (full[0][1].input_ids[:, 0] == full[0][1].labels * t + 1).all()
