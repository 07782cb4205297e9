"""Training on running board daemons from a registry (control/remote.py, `edgert train --registry`).

Two `edgert serve` daemons are started here as independent processes (not by a cluster), with the
keys of `edgert keys` and a registry like the one boards/provision.sh --start writes. The main job
attached to them (real MiniLM, real Rotten Tomatoes, split 0:3,3:6, 3 steps of 2 x 2 x 16 tokens:
the stages test_faults.py compiles, cached per CI session) must compute what the same job computes
in one process: losses and held-out metrics equal, bit for bit (as tests/integration/
test_cluster.py). That job's schedule gives its last step lr 0, so the weights are compared by the
unattended-run test below, whose every step moves them. Afterwards both daemons still run and
answer a new controller. A bad registry, a missing board and a silent endpoint give errors that
say what to fix.
"""

from __future__ import annotations

import json
import select
import socket
import subprocess
import sys
import time

import pytest

from control import checkpoint
from control.remote import AttachedCluster, read_registry
from edgert.errors import BoardError, ConfigError
from edgert.transport import generate_keys

pytestmark = pytest.mark.slow
NAMES = ["rk0", "rk1"]


def _start(name: str, keys, workdir) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "edgert", "serve", "--name", name, "--port", "0",
                             "--keys", str(keys), "--workdir", str(workdir / name), "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 1.0)
        line = proc.stdout.readline().decode() if ready else ""
        if line.startswith("edgert-board "):
            return proc, line.split()[-1]
        if proc.poll() is not None:
            break
    proc.kill()
    raise RuntimeError(f"board {name} did not start")


@pytest.fixture(scope="module")
def daemons(tmp_path_factory):
    root = tmp_path_factory.mktemp("remote")
    keys = root / "keys"
    generate_keys(keys, NAMES)
    procs, reg = [], {}
    try:
        for n in NAMES:
            p, ep = _start(n, keys, root)
            procs.append(p)
            reg[n] = {"endpoint": ep, "profile": "local", "arch": "x86_64"}
        (keys / "boards.json").write_text(json.dumps(reg))
        yield keys / "boards.json", procs
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_job_on_attached_boards_equals_the_in_process_job(daemons, tmp_path):
    from control.job import finetune

    registry, procs = daemons
    kw = {"split": "0:3,3:6", "stages": None, "steps": 3, "batch": 2, "micro_batches": 2,
          "seq": 16, "eval_examples": 4, "export": False, "configs": {}}
    ref = finetune(out_dir=tmp_path / "ref", boards=False, **kw)
    # in reverse registry order: stage 0 on rk1
    rep = finetune(out_dir=tmp_path / "remote", registry=registry, board_names=["rk1", "rk0"], **kw)
    assert rep.losses == ref.losses
    assert rep.after == ref.after
    assert [b["name"] for b in rep.boards] == ["rk1", "rk0"]
    assert all(p.poll() is None for p in procs)            # the daemons keep running
    with AttachedCluster(registry) as c:                     # and answer a new controller
        assert [b["name"] for b in c.describe()] == NAMES


def test_a_silent_endpoint_is_named_within_the_start_timeout(daemons, tmp_path):
    registry, _ = daemons
    with socket.socket() as s:                              # a free port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    reg = json.loads(registry.read_text())
    reg["ghost"] = {"endpoint": f"tcp://127.0.0.1:{port}"}
    bad = registry.parent / "with_ghost.json"
    bad.write_text(json.dumps(reg))
    (registry.parent / "public" / "ghost.key").write_bytes(
        (registry.parent / "public" / "rk0.key").read_bytes())
    t0 = time.monotonic()
    with pytest.raises(BoardError, match=r"ghost.*daemon running"):
        AttachedCluster(bad, ["ghost"], start_timeout=1.0)
    assert time.monotonic() - t0 < 10


def test_bad_registries_say_how_to_fix_them(tmp_path):
    p = tmp_path / "boards.json"
    with pytest.raises(ConfigError, match="does not exist: boards/provision.sh --start"):
        read_registry(p)
    p.write_text("{not json")
    with pytest.raises(ConfigError, match="not readable JSON"):
        read_registry(p)
    p.write_text(json.dumps({"rk0": {"endpoint": "tcp://10.0.0.5:7700"}}))
    assert read_registry(p) == {"rk0": "tcp://10.0.0.5:7700"}
    with pytest.raises(ConfigError, match=r"'pi0' is not in .*\['rk0'\]"):
        read_registry(p, ["pi0"])
    p.write_text(json.dumps({"rk0": {"endpoint": "10.0.0.5"}}))
    with pytest.raises(ConfigError, match="tcp://HOST:PORT"):
        read_registry(p)
    p.write_text(json.dumps({"rk0": {"endpoint": "tcp://127.0.0.1:1"}}))
    with pytest.raises(ConfigError, match="key files missing"):
        AttachedCluster(p, keys=tmp_path / "nokeys")


def test_unattended_run_on_attached_boards_equals_the_local_run(daemons, tmp_path):
    """`edgert run` with `registry` in run.toml: the same steps, losses and final state (weights,
    AdamW moments, step) as on local boards, bit for bit. Both steps move the weights (lr 1e-4 x
    1/2, 2/2: tests/run_util.py [Note: the last step must count]), and the local run's state after
    step 1 fails the comparison."""
    from control.run import Run, RunConfig
    from tests.run_util import TrainState, assert_same_state

    registry, procs = daemons
    kw = {"boards": 2, "split": "0:3,3:6", "steps": 2, "batch": 2, "seq": 16, "micro_batches": 2,
          "lr": 1e-4, "warmup": 2, "checkpoint_every": 1, "eval_examples": 4, "threads": 1,
          "export_hf": False}

    def losses(run_dir) -> list[float]:
        evs = [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines()]
        return [e["loss"] for e in evs if e["kind"] == "step"]

    local = Run(RunConfig(**kw), tmp_path / "local")
    local.start()
    remote = Run(RunConfig(**kw, registry=str(registry), board_names="rk1,rk0"), tmp_path / "rem")
    remote.start()
    assert local.state == remote.state == "finished"
    assert losses(remote.dir) == losses(local.dir) and len(losses(local.dir)) == 2
    want = TrainState.of_checkpoint(local.latest_checkpoint())
    assert_same_state(TrainState.of_checkpoint(remote.latest_checkpoint()), want)
    after_1 = TrainState.of_checkpoint(checkpoint.verify(local.checkpoint_dir / "step-1"))
    with pytest.raises(AssertionError, match="weight tensors differ"):
        assert_same_state(TrainState(after_1.params, want.opt, want.step), want)
    assert all(p.poll() is None for p in procs)
    with pytest.raises(ConfigError, match="board_names picks boards of a registry"):
        RunConfig(board_names="rk0")
