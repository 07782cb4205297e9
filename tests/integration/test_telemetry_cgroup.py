"""Push telemetry from real board processes, and cgroup v1 memory caps on local boards.

Telemetry: boards publish on a CURVE PUB socket; the cluster's TelemetryClient receives records
(idle, and after steps of real MiniLM training), reports a stopped board dead after 3 silent
intervals and alive again when it resumes; a subscriber without the cluster's key gets nothing.
Caps: a board under its cap trains normally; a board whose cap is below its working set is
killed by the kernel and the controller's error names the cap.
"""

from __future__ import annotations

import os
import signal
import statistics
import time

import pytest
import zmq

from control.cgroup import MemoryCgroup, own_memory_cgroup
from control.cluster import LocalCluster
from control.job import compile_bundles, load_model
from control.local import OptimConfig
from control.telemetry import board_event
from edgert.errors import BoardError, ConfigError

B, T, M = 2, 16, 2
MIB = 1 << 20


def _cgroup_v1_reason() -> str | None:
    try:
        own_memory_cgroup()
    except ConfigError as e:
        return str(e)
    return None


needs_cgroup = pytest.mark.skipif(_cgroup_v1_reason() is not None,
                                  reason=f"cgroup v1 memory unavailable: {_cgroup_v1_reason()}")


@pytest.fixture(scope="module")
def idle():
    with LocalCluster(1, telemetry_s=0.2, timeout=30) as c:
        yield c


def _received(c: LocalCluster, board: str, n: int, timeout: float = 10.0) -> bool:
    assert c.telemetry is not None
    return c.telemetry.wait_for(
        lambda s: board in s.boards and s.boards[board].received >= n, timeout)


def test_idle_board_pushes_records_at_its_interval(idle):
    assert _received(idle, "board0", 6)
    hist = idle.telemetry.history("board0")
    rec = hist[-1]
    assert rec["board"] == "board0" and rec["pid"] == idle.boards[0].proc.pid
    assert rec["stage"] is None and rec["bundle"] is None and rec["step"] is None
    assert rec["interval"] == 0.2 and rec["queue"] == 0 and rec["errors"] == 0
    assert 10 * MIB < rec["rss"] <= rec["peak_rss"] < 512 * MIB
    gaps = [b["t"] - a["t"] for a, b in zip(hist, hist[1:], strict=False)]
    assert 0.15 < statistics.median(gaps) < 0.5                # pushed every ~0.2 s
    assert [r["seq"] for r in hist] == list(range(hist[0]["seq"], hist[0]["seq"] + len(hist)))
    assert idle.telemetry.snapshot()["board0"]["alive"] is True


def test_stopped_board_is_reported_dead_then_alive_again(idle):
    pid = idle.boards[0].proc.pid
    assert _received(idle, "board0", 2)
    os.kill(pid, signal.SIGSTOP)
    try:
        deadline = time.monotonic() + 5
        while idle.telemetry.alive()["board0"] and time.monotonic() < deadline:
            time.sleep(0.05)
        silent = time.monotonic() - idle.telemetry.state.boards["board0"].last_seen
        assert idle.telemetry.alive() == {"board0": False}
        assert silent > 3 * 0.2
        assert board_event(idle.telemetry.snapshot()["board0"])["alive"] is False
    finally:
        os.kill(pid, signal.SIGCONT)
    n = idle.telemetry.state.boards["board0"].received
    assert _received(idle, "board0", n + 1)
    assert idle.telemetry.alive() == {"board0": True}


def test_subscriber_without_the_cluster_key_gets_nothing(idle):
    board = idle.boards[0]
    ep = idle.telemetry.endpoints["board0"]
    pub, sec = zmq.curve_keypair()                     # a key the cluster never authorized
    ctx = zmq.Context()
    try:
        socks = []
        for mode in ("wrong key", "no curve", "cluster key"):
            s = ctx.socket(zmq.SUB)
            s.linger = 0
            if mode == "wrong key":
                s.curve_publickey, s.curve_secretkey = pub, sec
            elif mode == "cluster key":              # the control: the same code path receives
                s.curve_publickey, s.curve_secretkey = idle.keys.secret("controller")
            if mode != "no curve":
                s.curve_serverkey = idle.keys.public(board.name)
            s.setsockopt(zmq.SUBSCRIBE, b"")
            s.connect(ep)
            socks.append(s)
        assert socks[2].poll(3000), "a subscriber with the cluster key got no telemetry"
        assert socks[0].poll(1500) == 0, "a subscriber with a foreign key got telemetry"
        assert socks[1].poll(100) == 0, "a subscriber without CURVE got telemetry"
    finally:
        ctx.destroy(linger=0)


# ---- with a deployed bundle ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def bundles(minilm_dir, build_root):
    model = load_model(minilm_dir, num_labels=2, head_seed=0)
    return compile_bundles(model, build_root / "telemetry_k2", stages=2, batch=B, seq=T,
                           progress=False)


def _train_two_steps(c: LocalCluster, bundles, real_batch) -> None:
    c.deploy(bundles, micro_batches=M)
    for s in range(2):
        c.train_step([real_batch(B, T, offset=(M * s + j) * B) for j in range(M)],
                     OptimConfig(lr=1e-4))


@pytest.mark.slow
def test_boards_push_step_telemetry(bundles, real_batch):
    with LocalCluster(2, telemetry_s=0.5, timeout=120) as c:
        seen: list[tuple[str, dict]] = []
        c.telemetry.subscribe(lambda board, rec: seen.append((board, rec)))
        _train_two_steps(c, bundles, real_batch)
        assert c.telemetry.wait_for(lambda st: all(
            st.boards[b].latest.get("step") == 2 for b in ("board0", "board1")), 10)
        replies = {k[0]: v.header.body for k, v in c.last_step_replies.items()}
        for i, name in enumerate(("board0", "board1")):
            rec = c.telemetry.latest(name)
            assert rec["stage"] == i and rec["bundle"] == f"stage{i}" and rec["mode"] == "sync"
            assert rec["steps"] == 2 and rec["errors"] == 0 and rec["last_error"] is None
            # the record pushed right after the step carries that step's own numbers
            assert rec["compute_s"] == replies[name]["compute_s"] > 0
            assert rec["wait_s"] == replies[name]["wait_s"] >= 0
            ev = board_event(rec, budget_mib=1024)
            assert ev["name"] == name and ev["stage"] == i and ev["peak_rss_mib"] > 100
        assert {b for b, r in seen if r.get("step") == 2} == {"board0", "board1"}


@needs_cgroup
@pytest.mark.slow
def test_capped_boards_train_within_their_cap(bundles, real_batch):
    """Boards under a 1 GiB cgroup v1 memory cap train; the cgroup saw their memory, no OOM kill.
    (On a host without cgroup v1 this is skipped, with the reason, not silently dropped.)"""
    with LocalCluster(2, mem_cap_mib=1024, timeout=120) as c:
        _train_two_steps(c, bundles, real_batch)
        assert c.stats(0)["steps"] == c.stats(1)["steps"] == 2
        for name in ("board0", "board1"):
            cg = c.cgroups[name].report()
            assert cg["oom_kill"] == 0 and cg["limit"] == 1024 * MIB
            assert 50 * MIB < cg["max_usage"] <= cg["limit"]


@needs_cgroup
@pytest.mark.slow
def test_board_over_its_cap_is_killed_and_the_error_names_the_cap(bundles):
    with LocalCluster(2, mem_cap_mib=100, timeout=60) as c:
        with pytest.raises(BoardError, match=r"board\d \(pid \d+\) exited with code -9; board\d "
                                             r"hit its memory cap of 100 MiB \(cgroup v1"):
            c.deploy(bundles, micro_batches=M)
        dead = [n for n, cg in c.cgroups.items() if cg.oom_control()["oom_kill"] > 0]
        assert dead and all(c.cgroups[n].max_usage() >= 99 * MIB for n in dead)
        paths = [cg.path for cg in c.cgroups.values()]
    assert not any(p.exists() for p in paths)                  # removed on close


def test_missing_cgroup_v1_is_a_config_error_with_the_fix(tmp_path):
    proc = tmp_path / "cgroup"
    proc.write_text("0::/user.slice\n")                       # a cgroup-v2-only host
    with pytest.raises(ConfigError, match=r"no ':memory:' line.*Run without mem_cap_mib"):
        own_memory_cgroup(proc, tmp_path)
    proc.write_text("4:memory:/x\n")
    with pytest.raises(ConfigError, match="not mounted"):
        own_memory_cgroup(proc, tmp_path)
    with pytest.raises(ConfigError, match=">= 4 MiB"):
        MemoryCgroup.create("b", 1024, parent=tmp_path)
