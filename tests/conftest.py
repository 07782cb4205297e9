"""Shared fixtures: the default model, real tokenized batches, and compiled bundles (session-cached)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TVM_NUM_THREADS", str(len(os.sched_getaffinity(0))))


@pytest.fixture(scope="session", autouse=True)
def _private_build_cache(tmp_path_factory):
    """Compiled libraries go to a per-session cache, never the user's ~/.cache/edgert."""
    old = os.environ.get("EDGERT_CACHE")
    os.environ["EDGERT_CACHE"] = str(tmp_path_factory.mktemp("edgert-cache"))
    yield
    if old is None:
        os.environ.pop("EDGERT_CACHE", None)
    else:
        os.environ["EDGERT_CACHE"] = old


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: compiles a whole model (tens of seconds); part of CI")


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    from compiler.hf import default_model_dir

    return default_model_dir()


@pytest.fixture(scope="session")
def real_batch(minilm_dir):
    """Factory: a real tokenized Rotten Tomatoes batch of B sentences padded to T tokens."""
    from control.data import Tokenizer, load_rotten_tomatoes

    texts, labels = load_rotten_tomatoes()
    tok = Tokenizer(minilm_dir / "tokenizer.json")

    def make(B: int, T: int, offset: int = 0) -> dict[str, np.ndarray]:
        idx = np.arange(offset, offset + B) * 97 % len(texts)   # a spread of both labels
        enc = tok.encode([texts[i] for i in idx], T)
        return {**enc, "labels": labels[idx].astype(np.int64)}

    return make


@pytest.fixture(scope="session")
def build_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bundles")


@pytest.fixture(scope="session")
def whole_model_bundle(minilm_dir, build_root) -> Path:
    """MiniLM + a new 2-label head (head_seed 0) as one whole-model bundle (K = 1) at batch 2 x 16
    tokens: what the forward-gradient clients load. Compiled once per session, read-only."""
    from control.job import compile_bundles, load_model

    model = load_model(minilm_dir, num_labels=2, head_seed=0)
    return compile_bundles(model, build_root / "whole_k1_b2_t16", stages=1, batch=2, seq=16,
                           progress=False)[0]
