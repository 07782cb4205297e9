"""Forward gradients on the SmolLM2 decoder (issue 10: causal LM in forward-gradient mode).

Real SmolLM2-135M-Instruct weights cut to their first 2 layers, LoRA r = 8 on the fused QKV, one
whole-model bundle (K = 1, 2 x 16 tokens of movie dialog, the shape test_llama_train.py compiles).
The board-side client (edgert.fwdgrad.ForwardClient) reads the decoder's data inputs from the
manifest (input_ids, attention_mask, labels [B, T]) and runs the forward-only `stage_loss` entry.

* Central differences along 32 LoRA-B perturbations equal g . v, with g from the bundle's own
  compiled backward (itself checked against the float64 reference in
  test_llama_stage_gradients.py): relative error < 1e-2 at eps 1e-3 in float32.
* Two federated rounds on two board processes give the same server values as the same rounds
  with the clients in this process (rtol 1e-6: the same kernels on the same data).
"""

from __future__ import annotations

import numpy as np
import pytest

from control.decoder import compile_decoder_bundles, corpus_blocks, lm_batches, load_decoder
from control.federated import BoardClients, FwdGradRun, InProcessClients
from control.fwdgrad import FwdGradConfig, flatten, trainable_names
from control.local import LocalPipeline
from edgert.fwdgrad import ForwardClient, perturbation
from edgert.runtime import TvmStage

pytestmark = pytest.mark.slow
N_LAYERS, B, T = 2, 2, 16


@pytest.fixture(scope="module")
def setup(build_root):
    dec = load_decoder(layers=N_LAYERS)
    (bundle,) = compile_decoder_bundles(dec, build_root / "lm_fwdgrad", stages=1, lora=8,
                                        batch=B, seq=T)
    blocks = corpus_blocks(dec.tokenizer_file, T, 8)
    return bundle, lm_batches(blocks, B)


def test_decoder_directional_derivatives_match_backprop(setup):
    bundle, batches = setup
    batch = batches[0]
    _, grads = LocalPipeline([bundle]).grads(batch)
    st = TvmStage.load(bundle)
    names = trainable_names([t.name for t in st.manifest.params], "lora")
    assert names and all(n.endswith(".lora_B") for n in names)
    g = flatten(grads[0], names)
    cl = ForwardClient(st)
    assert cl.data_names == ["input_ids", "attention_mask", "labels"]
    cl.set_shard(batch)
    before = st.params_numpy()
    seeds = list(range(500, 532))
    r = cl.round(names, seeds, 1e-3, list(range(B)))
    assert all(np.array_equal(before[k], v) for k, v in st.params_numpy().items())
    d = np.array(r["derivs"])
    ref = np.array([g @ perturbation(s, g.size) for s in seeds])
    err = np.linalg.norm(d - ref) / np.linalg.norm(ref)
    print(f"decoder LoRA-B: n = {g.size}, relative error of the derivatives {err:.1e}")
    assert err < 1e-2
    assert np.linalg.norm(g) > 0     # B = 0 at init, but dL/dB = s G (A x)^T is not zero


def test_decoder_federated_rounds_on_boards_equal_in_process(setup):
    from control.cluster import LocalCluster

    bundle, batches = setup
    shards = [{k: np.concatenate([b[k] for b in batches[i::2]]) for k in batches[0]}
              for i in range(2)]
    st = TvmStage.load(bundle)
    base = st.params_numpy()
    names = trainable_names(list(base), "lora")
    cfg = FwdGradConfig(lr=0.01, k_init=4, k_max=4, eps=1e-3)

    def run(clients) -> FwdGradRun:
        srv = FwdGradRun(clients, names, {n: base[n] for n in names}, cfg, rows_per_round=B)
        for r in range(2):
            srv.round(r)
        return srv

    local = run(InProcessClients(st, shards))
    with LocalCluster(2, threads=1) as cluster:
        boards = run(BoardClients(cluster, bundle, shards))
    for n in names:
        np.testing.assert_allclose(boards.values[n], local.values[n], rtol=1e-6, atol=1e-9,
                                   err_msg=n)
    assert [x.loss for x in boards.log] == pytest.approx([x.loss for x in local.log], rel=1e-6)
    assert all(np.isfinite(x.loss) for x in boards.log)
    assert any(np.abs(boards.values[n] - base[n]).max() > 0 for n in names)   # it moved
