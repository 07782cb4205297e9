"""Forward gradients on the real MiniLM: board-side derivatives vs backprop, and federated boards.

One whole-model bundle (K = 1, batch 2 x 16 tokens: the shape test_cluster.py compiles, so the
session cache builds it once). Backprop gradients come from the bundle's own `stage_backward` with
dropout off, itself checked against the float64 reference in test_stage_gradients.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from control.federated import BoardClients, FwdGradRun, _eval, split_clients
from control.fwdgrad import FwdGradConfig, estimate, flatten, trainable_names
from control.local import LocalPipeline
from edgert.errors import BoardError
from edgert.fwdgrad import ForwardClient, perturbation
from edgert.protocol import Kind
from edgert.runtime import TvmStage

pytestmark = pytest.mark.slow
B, T = 2, 16


@pytest.fixture(scope="module")
def bundle(whole_model_bundle):
    return whole_model_bundle     # batch B x T (tests/conftest.py)


@pytest.fixture(scope="module")
def derivs(bundle, real_batch):
    """Board-side derivatives along 64 BitFit perturbations, and the backprop gradient."""
    batch = real_batch(B, T, offset=40)
    _, grads = LocalPipeline([bundle]).grads(batch)
    st = TvmStage.load(bundle)
    names = trainable_names([t.name for t in st.manifest.params], "bitfit")
    g = flatten(grads[0], names)
    cl = ForwardClient(st)
    cl.set_shard(batch)
    before = st.params_numpy()
    seeds = list(range(1000, 1064))
    r = cl.round(names, seeds, 1e-3, list(range(B)))
    after = st.params_numpy()
    assert all(np.array_equal(before[k], after[k]) for k in before), "params not restored"
    return g, seeds, np.array(r["derivs"]), r


def test_directional_derivatives_match_backprop(derivs):
    """Central differences of the compiled forward (float32, eps 1e-3) equal g . v from the
    compiled backward to 1e-3 relative (measured ~4e-5) over 64 BitFit directions."""
    g, seeds, d, r = derivs
    ref = np.array([g @ perturbation(s, g.size) for s in seeds])
    assert np.linalg.norm(d - ref) / np.linalg.norm(ref) < 1e-3
    assert r["evals"] == 2 * len(seeds)
    assert g.size > 30000     # the BitFit set of MiniLM-L6 + head: ~32k values


def test_estimate_cosine_grows_with_perturbations(derivs):
    """For an unbiased estimator with n >> k, n cos^2(g_hat, g) ~ chi^2_k: check k = 4, 16, 64
    against the chi^2 0.05%..99.95% range, and that the cosine grows with k."""
    g, seeds, d, _ = derivs
    cos = []
    for k in (4, 16, 64):
        est = estimate(d[:k], seeds[:k], g.size)
        c = float(est @ g / np.linalg.norm(est) / np.linalg.norm(g))
        lo, hi = np.quantile(np.random.default_rng(k).chisquare(k, 400_000), [0.0005, 0.9995])
        assert lo < g.size * c * c < hi, (k, c)
        cos.append(c)
    assert cos[0] < cos[1] < cos[2]


def test_boards_lower_the_clients_loss(bundle, minilm_dir):
    """Two board processes with non-IID shards of 8 sentences each: forward gradients on the head
    lower the federated objective (the mean loss over the clients' data), and the uplink is scalars.

    Every loss and derivative comes from the boards; the controller only aggregates and updates.
    Why not held-out loss at this size: even exact backprop SGD on these 40 examples moves the
    held-out loss by < 0.001 (measured; docs/fwdgrad.md), so the bench measures that at scale.
    Also: a round before load and one naming an unknown tensor are refused with a clear error."""
    from control.cluster import LocalCluster
    from control.job import rotten_tomatoes_batches

    enc, y, _ = rotten_tomatoes_batches(minilm_dir / "tokenizer.json", T, B, 0, 0)
    y = np.asarray(y)
    parts = [p[:8] for p in split_clients(y, 2, alpha=1.0, seed=0)]
    shards = [{**{k: v[p] for k, v in enc.items()}, "labels": y[p]} for p in parts]
    own = [{k: v[i:i + B] for k, v in sh.items()} for sh in shards for i in range(0, 8, B)]
    st = TvmStage.load(bundle)
    base = st.params_numpy()
    names = trainable_names(list(base), "head")
    cfg = FwdGradConfig(lr=0.05, k_init=8, k_max=8, eps=1e-3)
    with LocalCluster(2, threads=1) as cluster:
        with pytest.raises(BoardError, match="send op 'load' first"):
            cluster.request(cluster.boards[0], Kind.FWDGRAD,
                            body={"op": "round", "names": names, "seeds": [1]})
        clients = BoardClients(cluster, bundle, shards)
        srv = FwdGradRun(clients, names, {n: base[n] for n in names}, cfg, rows_per_round=B)
        logs = [srv.round(r) for r in range(12)]
        with pytest.raises(BoardError, match="not parameters of this bundle"):
            cluster.request(cluster.boards[1], Kind.FWDGRAD,
                            arrays={"nope": np.zeros(2, np.float32)},
                            body={"op": "round", "names": ["nope"], "seeds": [1], "eps": 1e-3,
                                  "rows": [0, 1]})
        rss = clients.peak_rss()
    before = _eval(st, base, {}, own)
    after = _eval(st, base, srv.values, own)
    assert after["loss"] < before["loss"] - 0.1, (before, after)   # measured 0.688 -> 0.401
    # uplink: 8 derivatives per board and round as JSON, vs 770 float32 head gradients (3 KB)
    assert all(x.bytes_up < 2 * 4 * 770 for x in logs) and all(x.k == 8 for x in logs)
    assert all(r > 0 for r in rss)
    # Board memory (docs/fwdgrad.md "Memory"): the upload is spooled to disk chunk by chunk and the
    # parameters are read tensor by tensor, so no phase holds a second copy of the 87 MiB file
    # (measured at batch 8 x 32: +41..49 MiB uploaded, +113..116 MiB at the end; before: +200).
    file_mib = (bundle / "params.safetensors").stat().st_size / 2 ** 20
    for i in range(2):
        idle = clients.memory["idle"][i]["peak_rss_mib"]
        assert clients.memory["uploaded"][i]["peak_rss_mib"] - idle < file_mib, clients.memory
        assert clients.memory["end"][i]["peak_rss_mib"] - idle < 1.5 * file_mib, clients.memory
