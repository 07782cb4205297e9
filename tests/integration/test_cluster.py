"""Board daemons as separate processes over CURVE ZeroMQ on 127.0.0.1.

Acceptance: sync 1F1B with a flush on K = 2 and 3 boards reproduces the single-process K = 1 run
(LocalPipeline) over 20 steps of real MiniLM training: per-step losses, final weights, AdamW
moments and step count are equal (measured bit-identical; a board runs the same kernels on its
layers, in the same order). The learning rate decays from 1e-4 to 1e-5 at the last step, never to
0, so every step shows in the weights (tests/run_util.py [Note: the last step must count]).
Faults: malformed, truncated, oversized frames and a wrong protocol version get an ERROR and the
board keeps serving; a client without the cluster's key gets nothing; a bundle over the
board's budget is refused before TVM's runtime is even loaded.
"""

from __future__ import annotations

import json
import re
import time

import numpy as np
import pytest
import zmq

from control.cluster import LocalCluster
from control.job import compile_bundles, load_model
from control.local import LocalPipeline, OptimConfig
from edgert.contract import seed_vec, step_seed
from edgert.errors import BoardError, ConfigError
from edgert.protocol import MAGIC, Kind, Message, encode
from edgert.transport import ZmqTransport
from tests.run_util import TrainState, assert_same_state

pytestmark = pytest.mark.slow
B, T, M, STEPS = 2, 16, 2, 20
OPT = OptimConfig(lr=1e-4, warmup_steps=2, total_steps=STEPS + 2)   # last step: lr 1e-5


@pytest.fixture(scope="module")
def bundles(minilm_dir, build_root):
    model = load_model(minilm_dir, num_labels=2, head_seed=0)
    return {k: compile_bundles(model, build_root / f"cluster_k{k}", stages=k, batch=B, seq=T,
                               progress=False) for k in (1, 2, 3)}


@pytest.fixture(scope="module")
def micro_batches(real_batch):
    return [[real_batch(B, T, offset=(M * s + j) * B) for j in range(M)] for s in range(STEPS)]


@pytest.fixture(scope="module")
def reference(bundles, micro_batches):
    """(losses, final state, state after STEPS - 1 steps) of the single-process run."""
    pipe = LocalPipeline(bundles[1])
    losses = [pipe.train_step(mb, OPT) for mb in micro_batches[:-1]]
    short = TrainState.of(pipe)
    losses.append(pipe.train_step(micro_batches[-1], OPT))
    return losses, TrainState.of(pipe), short


def test_the_comparison_sees_the_last_step(reference):
    """The test of the tests here: a state one step short of the reference fails the comparison,
    in its weights alone too (OptimConfig's default decay to lr 0 would make them equal)."""
    _, final, short = reference
    assert OPT.lr_at(STEPS) > 0
    with pytest.raises(AssertionError, match="optimizer step 19, want 20"):
        assert_same_state(short, final)
    with pytest.raises(AssertionError, match="weight tensors differ"):
        assert_same_state(TrainState(short.params, final.opt, final.step), final)


@pytest.mark.parametrize("k", [2, 3])
def test_sync_pipeline_matches_single_process(k, bundles, micro_batches, reference):
    ref_losses, ref_state, _ = reference
    with LocalCluster(k) as c:
        c.deploy(bundles[k], micro_batches=M)
        losses = [c.train_step(mb, OPT) for mb in micro_batches]
        state = TrainState.of(c)
        profiles = [c.profile(i) for i in range(k)]
        stats = c.stats(k - 1)
    rel = np.abs(np.array(losses) - ref_losses) / np.abs(ref_losses)
    print(f"K={k}: max relative loss difference {rel.max():.1e}")
    assert losses == ref_losses, list(zip(losses, ref_losses, strict=True))
    assert_same_state(state, ref_state)
    for p in profiles:      # boards run TVM's runtime only
        assert p["modules"]["tvm_ffi"], p
        assert not any(p["modules"][m] for m in ("tvm", "tvm.relax", "torch", "compiler",
                                                 "control")), p
        assert 0 < p["rss"] <= p["peak_rss"]
    assert stats["steps"] == STEPS and stats["errors"] == 0 and len(stats["step_s"]) == STEPS
    print(f"K={k}: board{k - 1} median step "
          f"{1000 * np.median(stats['step_s']):.0f} ms, peak RSS {stats['peak_rss'] >> 20} MiB")


def test_resume_from_state_then_dead_board_is_reported(bundles, micro_batches, reference):
    """STATE set/get restores a run exactly: 10 steps, reload, 10 more = the 20-step reference."""
    ref_losses, ref_state, _ = reference
    with LocalCluster(2, timeout=30) as c:
        c.deploy(bundles[2], micro_batches=M)
        for mb in micro_batches[:10]:
            c.train_step(mb, OPT)
        params, opt = c.params(), c.optimizer_state()
        c.deploy(bundles[2], micro_batches=M)            # fresh stages, step 0
        c.load_state(params, opt, step=10)
        losses = [c.train_step(mb, OPT) for mb in micro_batches[10:]]
        assert losses == ref_losses[10:]
        assert_same_state(TrainState.of(c), ref_state)
        c.boards[1].proc.kill()
        with pytest.raises(BoardError, match=r"board1 \(pid \d+\) exited"):
            c.train_step(micro_batches[0], OPT)


def test_redeploy_in_place_runs_the_new_stage(bundles, micro_batches, reference):
    """A board re-planned from stage 0 of 2 to the whole model (same bundle name "stage0") must run
    the new library: the dynamic loader caches by path (edgert/runtime.py [Note: dlopen caches by
    path]), which once made a recovered board refuse every step with the old stage's arity."""
    ref_losses, _, _ = reference
    with LocalCluster(2) as c:
        c.deploy(bundles[2], micro_batches=M)
        c.train_step(micro_batches[0], OPT)
        c.deploy(bundles[1], micro_batches=M)            # board0 again gets "stage0"
        losses = [c.train_step(mb, OPT) for mb in micro_batches[:2]]
    assert losses == ref_losses[:2]


def test_async_2bw_trains_on_boards(bundles, real_batch):
    one = real_batch(B, T, offset=0)
    n = 24
    with LocalCluster(2) as c:
        c.deploy(bundles[2], micro_batches=n, mode="async", update_every=2)
        losses = c.train_async([one] * n, OptimConfig(lr=5e-4))
        versions = [r.header.body["max_versions"] for r in c.last_step_replies.values()]
    assert np.mean(losses[-4:]) < np.mean(losses[:4])
    assert max(versions) == 2


def _reference_2bw(bundles, micro, group, opt):
    """PipeDream-2BW semantics in one process: the micro-batches of update group g run forward and
    backward on weight version max(0, g-1) (one stashed version), and their accumulated gradient is
    applied to the newest version: W(g+1) = W(g) - update(grad at W(g-1))."""
    pipe = LocalPipeline(bundles)
    versions, losses = {0: pipe.params()}, []
    moments = [(st.zeros_like_params(), st.zeros_like_params()) for st in pipe.stages]   # AdamW
    for g in range(len(micro) // group):
        for st in pipe.stages:
            st.set_params(versions[max(0, g - 1)])
        acc = None
        for j in range(group):
            loss, _, gr = pipe.forward_backward(micro[g * group + j],
                                                seed_vec(step_seed(0, 1 + g, j), True), 1.0 / group)
            losses.append(loss)
            acc = gr if acc is None else [st.accumulate(a, b) for st, a, b in zip(pipe.stages, acc, gr)]
        for st in pipe.stages:
            st.set_params(versions[g])
        for st, gg, (m, v) in zip(pipe.stages, acc, moments, strict=True):
            st.optimizer_step(gg, m, v, opt.hyper(g + 1))
        versions[g + 1] = pipe.params()
    return losses, versions[len(micro) // group]


def test_async_2bw_equals_single_process_2bw_reference(bundles, micro_batches):
    """The async pipeline computes exactly PipeDream-2BW's update rule (not an approximation of it)."""
    micro = [mb for step in micro_batches[:4] for mb in step]          # 8 micro-batches, 4 updates
    opt = OptimConfig(lr=1e-3)
    with LocalCluster(2) as c:
        c.deploy(bundles[2], micro_batches=len(micro), mode="async", update_every=2)
        losses = c.train_async(micro, opt)
        params = c.params()
    ref_losses, ref_params = _reference_2bw(bundles[2], micro, 2, opt)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    for k, v in ref_params.items():
        np.testing.assert_allclose(params[k], v, rtol=1e-5, atol=1e-7, err_msg=k)


def test_planner_memory_model_equals_board_estimate(bundles):
    """control/partition.py's footprint model agrees exactly with what the boards enforce
    (edgert.contract.estimate_footprint on the compiled manifests), for K = 1, 2, 3."""
    from compiler.model_spec import ModelDims
    from control.partition import BoardSpec, bert_costs, evaluate
    from edgert.artifact import load_manifest
    from edgert.contract import estimate_footprint

    for k, paths in bundles.items():
        ms = [load_manifest(p, verify=False) for p in paths]
        dims = ModelDims(**ms[0].dims)
        ranges = [(m.stage["first"], m.stage["last"]) for m in ms]
        p = evaluate(bert_costs(dims, B, T), [BoardSpec(f"b{i}") for i in range(k)], ranges, 4)
        for m, s in zip(ms, p.stages, strict=True):
            assert estimate_footprint(m, s.in_flight)["total"] == s.memory, (k, m.index)


# ---- faults -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fault_cluster():
    with LocalCluster(1, budget_mib=64, max_msg_mib=8, timeout=30) as c:
        yield c


@pytest.fixture
def probe(fault_cluster):
    t = fault_cluster.client("probe")
    t.connect("board0", fault_cluster.boards[0].endpoint)
    yield t
    t.close()


def _reply(probe: ZmqTransport, timeout: float) -> Message | None:
    """The next message that is not a heartbeat, or None after `timeout` s."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        got = probe.recv(left)
        if got is not None and got[1].kind is not Kind.HEARTBEAT:
            return got[1]
    return None


def _error_for(probe: ZmqTransport, frames: list) -> dict:
    probe.send_raw("board0", frames)
    msg = _reply(probe, 10)
    assert msg is not None, "the board did not answer"
    assert msg.kind is Kind.ERROR
    return dict(msg.header.body)


def _header(**kw) -> bytes:
    h = {"kind": "act", "run": "", "seq": 1, "step": 0, "stage": 0, "mb": 0,
         "tensors": [{"name": "hidden", "dtype": "float32", "shape": [4]}], "body": {}}
    h.update(kw)
    return json.dumps(h).encode()


@pytest.mark.parametrize("frames,match", [
    ([b"junk"], "got 1 frame"),
    ([b"GET / HTTP/1.1", b"{}"], "not an edgert MAGIC"),
    ([MAGIC, b"{not json"], "not UTF-8 JSON"),
    ([MAGIC, _header(kind="launch")], "'kind' is 'launch'"),
    ([MAGIC, _header(), b"\0" * 7], r"has 7 bytes but the header needs 16"),          # truncated
    ([MAGIC, _header()], "lists 1 tensor.* but 0 tensor frame"),                      # truncated
    ([MAGIC, _header(tensors=[{"name": "x", "dtype": "float32", "shape": [1 << 30]}]), b""],
     "over max_tensor_bytes"),                                                        # oversized
    ([MAGIC, b" " * (300 * 1024)], "over max_header_bytes"),                          # oversized
    ([b"EDGERT/2", _header()], "speaks protocol EDGERT/2 but this side speaks EDGERT/1"),
])
def test_bad_frames_get_an_error_and_the_board_keeps_serving(fault_cluster, probe, frames, match):
    err = _error_for(probe, frames)
    assert err["type"] == "ProtocolError"
    assert re.search(match, err["message"]), err["message"]
    assert fault_cluster.request(fault_cluster.boards[0], Kind.HELLO).header.body["board"] == \
        "board0"


def test_bad_request_gets_an_error_and_the_board_keeps_serving(fault_cluster, probe):
    probe.send("board0", Message.make(Kind.STEP, "", 5, step=1, body={"seeds": []}))
    msg = _reply(probe, 10)
    assert msg.kind is Kind.ERROR and msg.header.body["ref_seq"] == 5
    assert "no stage loaded; send LOAD first" in msg.header.body["message"]
    probe.send("board0", Message.make(Kind.HELLO, "", 6))
    msg = _reply(probe, 10)
    assert msg.kind is Kind.HELLO and msg.header.body["ref_seq"] == 6


def test_frame_over_max_msg_size_drops_only_that_client(fault_cluster, probe):
    probe.send_raw("board0", [MAGIC, _header(), b"\0" * (9 << 20)])   # board limit: 8 MiB
    assert _reply(probe, 2) is None                  # libzmq closed that connection
    assert fault_cluster.request(fault_cluster.boards[0], Kind.HELLO).kind is Kind.HELLO


def test_client_without_the_cluster_key_gets_nothing(fault_cluster, tmp_path):
    board = fault_cluster.boards[0]
    pub, sec = zmq.curve_keypair()                   # a key the cluster never authorized
    ctx = zmq.Context()
    try:
        socks = []
        for curve in (True, False):                  # wrong key; no CURVE at all
            s = ctx.socket(zmq.DEALER)
            s.linger = 0
            if curve:
                s.curve_publickey, s.curve_secretkey = pub, sec
                s.curve_serverkey = fault_cluster.keys.public(board.name)
            s.connect(board.endpoint)
            s.send_multipart(encode(Message.make(Kind.HELLO, "", 1)))
            socks.append(s)
        for s in socks:
            assert s.poll(2000) == 0, "an unauthenticated client got a reply"
        # Meanwhile the controller is served as usual.
        assert fault_cluster.request(board, Kind.HELLO).kind is Kind.HELLO
    finally:
        ctx.destroy(linger=0)


def test_plan_over_budget_is_refused_before_upload(fault_cluster, bundles):
    with pytest.raises(ConfigError, match=r"does not fit the boards' memory: board0 \(stage 0\): "
                                          r"needs \d+ MiB, budget 64 MiB"):
        fault_cluster.deploy(bundles[1], micro_batches=M)


def test_bundle_over_budget_is_refused_before_loading(fault_cluster, bundles):
    with pytest.raises(BoardError, match=r"needs an estimated [\d.]+ MiB = [\d.]+ MiB weights "
                                         r"\+ 3 x [\d.]+ MiB for the trained ones .* over this "
                                         r"board's budget of 64.0 MiB"):
        fault_cluster.deploy(bundles[1], micro_batches=M, check_memory=False)
    prof = fault_cluster.profile(0)
    assert prof["stage"] is None
    assert not prof["modules"]["tvm_ffi"]            # TVM's runtime was never even loaded
    assert prof["peak_rss"] < 512 << 20
