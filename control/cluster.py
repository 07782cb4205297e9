"""A local cluster: N board daemons as separate processes on 127.0.0.1, driven over CURVE ZeroMQ.

The controller side of the board protocol (edgert/board.py): start boards, deploy a K-stage plan
in chunks, stream each micro-batch's side inputs to the stages that take them, run steps, collect
losses, read weights back. A sync step reproduces LocalPipeline.train_step: the seeds and AdamW
hyper vectors are computed here with control.local's functions (see edgert/executor.py,
[Note: seeds and hyper-parameters come from the controller]).
"""

from __future__ import annotations

import ctypes
import itertools
import logging
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from control.cgroup import MemoryCgroup
from control.local import OptimConfig
from control.telemetry import TelemetryClient, reachable
from edgert.artifact import MANIFEST_FILE, Manifest, load_manifest
from edgert.contract import ACTIVATION, seed_vec, step_seed
from edgert.errors import BoardError, ConfigError
from edgert.deploy import chunk_file
from edgert.protocol import Kind, Message
from edgert.schedule import add_comms, add_step, async_1f1b, one_f_one_b, to_csv, validate
from edgert.transport import CONTROLLER, KeyRing, ZmqTransport, generate_keys

log = logging.getLogger(__name__)


@dataclass
class BoardProc:
    """One local board process."""

    name: str
    proc: subprocess.Popen[bytes]
    endpoint: str
    log_path: Path
    manifest: Manifest | None = None
    losses: dict[int, float] = field(default_factory=dict)

    def log_tail(self, n: int = 15) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()[-n:]
        except OSError:
            return "(no log)"
        return "\n".join("    " + line for line in lines)


try:        # resolved here, in the parent: the forked child must not dlopen (loader locks)
    _PRCTL: Any = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):
    _PRCTL = None


def _board_preexec() -> None:
    """In a board process before exec: ignore Ctrl-C (the controller stops the boards itself,
    after a checkpoint) and die with the controller (no orphan boards after a `kill -9`).

    PR_SET_PDEATHSIG fires when the *thread* that started the board exits: start a cluster in a
    thread that outlives it (the main thread, or the thread of a `control.run.Run`)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGKILL)           # 1 = PR_SET_PDEATHSIG


class LocalCluster:
    """N board processes on this machine plus the controller's links to them.

    Examples
    --------
    >>> with LocalCluster(2) as c:                                   # doctest: +SKIP
    ...     c.deploy(["build/stage0", "build/stage1"], micro_batches=2)
    ...     loss = c.train_step([batch0, batch1], OptimConfig(lr=1e-4))
    ...     weights = c.params()
    """

    def __init__(self, n_boards: int, *, budget_mib: float | None = None, threads: int = 1,
                 run_seed: int = 0, timeout: float = 120.0, start_timeout: float = 30.0,
                 workdir: Path | str | None = None, max_msg_mib: float | None = None,
                 mem_cap_mib: float | None = None, telemetry_s: float | None = None,
                 launcher: Callable[[str, list[str]], list[str]] | None = None) -> None:
        if type(n_boards) is not int or n_boards < 1:
            raise ConfigError(f"n_boards must be an integer >= 1, got {n_boards!r}")
        self._setup(run_seed, timeout, workdir)
        names = [f"board{i}" for i in range(n_boards)]
        self.keys = generate_keys(self.root / "keys", names)
        # Memory caps (control/cgroup.py) and push telemetry (control/telemetry.py).
        self.mem_cap_mib, self.telemetry_s = mem_cap_mib, telemetry_s
        # launcher(name, argv) -> argv: how a board starts, e.g. under qemu (control/boards.py)
        self.launcher = launcher
        try:
            self.boards = [self._spawn(n, budget_mib, threads, max_msg_mib) for n in names]
            self._wait_listening(start_timeout)
            self._connect(start_timeout)
        except BaseException:
            self.close()
            raise

    def _setup(self, run_seed: int, timeout: float, workdir: Path | str | None) -> None:
        """The controller-side state every cluster starts with (no boards, no links yet)."""
        self.timeout = timeout                  # s per request
        self.run_seed = run_seed
        self.step = 0
        self.load_replies: dict[str, dict[str, Any]] = {}   # board -> its last LOAD reply body
        self.n_mb = 0
        self.mode = "sync"
        self.group = 0
        self.stages: list[BoardProc] = []
        self.last_step_replies: dict[tuple[str, int], Message] = {}
        self._own_dir = workdir is None
        self.root = Path(tempfile.mkdtemp(prefix="edgert-cluster-") if workdir is None else workdir)
        self.keys: KeyRing
        self.boards: list[BoardProc] = []
        self.t: ZmqTransport | None = None
        self._seq = itertools.count(1)
        self._fence = 0          # requests before the last fence(): late ERRORs are stale
        self._closed = False
        self.mem_cap_mib: float | None = None
        self.telemetry_s: float | None = None
        self.launcher: Callable[[str, list[str]], list[str]] | None = None
        self.cgroups: dict[str, MemoryCgroup] = {}
        self.telemetry: TelemetryClient | None = None

    def _connect(self, timeout: float) -> None:
        """Link to every board's endpoint, HELLO each one, subscribe to their telemetry."""
        self.t = ZmqTransport(CONTROLLER, keys=self.keys, max_msg_bytes=-1)
        for b in self.boards:
            self.t.connect(b.name, b.endpoint)
        pubs = {b.name: self.request(b, Kind.HELLO, timeout=timeout).header.body.get("telemetry")
                for b in self.boards}
        self.telemetry = TelemetryClient(self.keys, {
            b.name: reachable(pubs[b.name], b.endpoint) for b in self.boards if pubs[b.name]})

    # ---- processes ------------------------------------------------------------------------------
    def _spawn(self, name: str, budget_mib: float | None, threads: int,
               max_msg_mib: float | None) -> BoardProc:
        log_path = self.root / f"{name}.log"
        cmd = [sys.executable, "-m", "edgert", "serve", "--name", name, "--port", "0",
               "--keys", str(self.root / "keys"), "--workdir", str(self.root / name),
               "--threads", str(threads)]
        if budget_mib is not None:
            cmd += ["--budget-mib", str(budget_mib)]
        if max_msg_mib is not None:
            cmd += ["--max-msg-mib", str(max_msg_mib)]
        if self.telemetry_s is not None:
            cmd += ["--telemetry-s", str(self.telemetry_s)]
        if self.launcher is not None:
            cmd = self.launcher(name, cmd)
        if self.mem_cap_mib is not None:
            cg = MemoryCgroup.create(name, int(self.mem_cap_mib * (1 << 20)))
            self.cgroups[name] = cg
            cmd = cg.wrap(cmd)        # the board joins its cgroup before Python starts
        with open(log_path, "wb") as errf:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errf,
                                    stdin=subprocess.DEVNULL, preexec_fn=_board_preexec)
        return BoardProc(name, proc, "", log_path)

    def _wait_listening(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for b in self.boards:
            assert b.proc.stdout is not None
            while not b.endpoint:
                left = deadline - time.monotonic()
                ready, _, _ = select.select([b.proc.stdout], [], [], max(0.0, left))
                line = b.proc.stdout.readline().decode(errors="replace") if ready else ""
                if line.startswith("edgert-board "):
                    b.endpoint = line.split()[-1]
                elif not line and (b.proc.poll() is not None or left <= 0):
                    raise BoardError(f"{b.name} did not start within {timeout:.0f} s "
                                     f"(exit code {b.proc.poll()}){self._death_note(b)}; its "
                                     f"log:\n{b.log_tail()}")

    def _check_alive(self) -> None:
        for b in self.boards:
            rc = b.proc.poll()
            if rc is not None:
                raise BoardError(f"{b.name} (pid {b.proc.pid}) exited with code {rc}"
                                 f"{self._death_note(b)}; its log:\n{b.log_tail()}")

    def _death_note(self, b: BoardProc) -> str:
        """'; <board> hit its memory cap ...' when a capped board was OOM-killed, else ''."""
        cg = self.cgroups.get(b.name)
        note = cg.oom_report() if cg is not None else None
        if note is None:
            return ""
        if b.manifest is not None and self.stages:     # what it was asked to hold
            from edgert.contract import estimate_footprint

            k, i = len(self.stages), self.stages.index(b) if b in self.stages else 0
            fp = estimate_footprint(b.manifest, min(k - i, self.n_mb or 1))["total"]
            need = fp / 2**20 + 45                     # + the idle runtime process, MiB
            note += (f". Its stage's estimate: {fp / 2**20:.0f} MiB of tensors + ~45 MiB of "
                     f"runtime = {need:.0f} MiB, {need - cg.limit_bytes / 2**20:+.0f} MiB against "
                     f"the cap (the estimate runs 1.3-1.9x low: docs/pipeline.md)")
        last = self.telemetry.latest(b.name) if self.telemetry is not None else None
        if last is not None:
            note += (f". Last telemetry: RSS {last['rss'] / 2**20:.0f} MiB, peak "
                     f"{last['peak_rss'] / 2**20:.0f} MiB, after step {last.get('step')}")
        return "; " + note

    # ---- messaging ------------------------------------------------------------------------------
    def send(self, b: BoardProc, kind: Kind, **kw: Any) -> int:
        seq = next(self._seq)
        self._send_msg(b, Message.make(kind, "", seq, **kw))
        return seq

    def _send_msg(self, b: BoardProc, msg: Message) -> None:
        assert self.t is not None
        self.t.send(b.name, msg)

    def collect(self, wanted: set[tuple[str, int]], timeout: float | None = None
                ) -> dict[tuple[str, int], Message]:
        """Replies keyed by (board, ref_seq) for every wanted pair; an ERROR raises BoardError."""
        assert self.t is not None
        deadline = time.monotonic() + (timeout or self.timeout)
        got: dict[tuple[str, int], Message] = {}
        next_check = time.monotonic() + 0.5
        while len(got) < len(wanted):
            left = deadline - time.monotonic()
            if left <= 0:
                missing = sorted(wanted - set(got))
                raise BoardError(f"no reply within {timeout or self.timeout:.0f} s from "
                                 f"{missing}; the boards' logs are in {self.root}")
            r = self.t.recv(min(left, 0.5))
            if r is None or time.monotonic() >= next_check:   # heartbeats must not hide a death
                self._check_alive()
                next_check = time.monotonic() + 0.5
            if r is None:
                continue
            peer, msg = r
            key = (str(peer), int(msg.header.body.get("ref_seq", -1)))
            if msg.kind is Kind.ERROR and key not in wanted and key[1] < self._fence:
                log.info("ignoring a late ERROR for request %d (sent before the last fence): %s",
                         key[1], msg.header.body.get("message"))
                continue
            if msg.kind is Kind.ERROR:
                body = msg.header.body
                raise BoardError(f"{peer} refused request {key[1]}: {body.get('type')}: "
                                 f"{body.get('message')}")
            if key in wanted:
                got[key] = msg
        return got

    def request(self, b: BoardProc, kind: Kind, timeout: float | None = None, **kw: Any
                ) -> Message:
        seq = self.send(b, kind, **kw)
        return self.collect({(b.name, seq)}, timeout)[(b.name, seq)]

    # ---- deploy ---------------------------------------------------------------------------------
    def deploy(self, bundle_dirs: list[Path | str], *, micro_batches: int = 2, mode: str = "sync",
               update_every: int | None = None, check_memory: bool = True,
               load_options: dict[str, Any] | None = None) -> None:
        """Upload stage i to board i, then LOAD it with its row of the schedule.

        load_options: extra LOAD body fields for every board, e.g. {"head_split_k": 6} or
        {"head_split_retune": True} (docs/head_split.md). The LOAD replies (footprint, the tuned
        head split) are kept in `self.load_replies` by board name.

        sync: 1F1B with a flush over `micro_batches` per step. async: PipeDream-2BW over a run
        of `micro_batches` in total (one `train_async` call), a STEP every `update_every`.
        """
        k = len(bundle_dirs)
        if not 1 <= k <= len(self.boards):
            raise ConfigError(f"{k} stages need 1..{len(self.boards)} boards")
        if mode == "sync":
            sched = add_comms(add_step(one_f_one_b(k, micro_batches)))
        elif mode == "async":
            sched = add_comms(async_1f1b(k, micro_batches, update_every))
        else:
            raise ConfigError(f"mode must be 'sync' or 'async', got {mode!r}")
        validate(sched, k, micro_batches)
        self.fence()
        self.mode, self.n_mb, self.step = mode, micro_batches, 0
        self.group = (update_every or k) if mode == "async" else micro_batches
        self.stages = self.boards[:k]
        if check_memory:   # the boards check again before loading (a second line of defence)
            self.check_plan_memory(bundle_dirs, sched)
        for i, d in enumerate(bundle_dirs):
            self._upload(self.boards[i], Path(d), f"stage{i}")
        csv = to_csv(sched)
        wanted = set()
        for i, b in enumerate(self.stages):
            b.manifest = load_manifest(Path(bundle_dirs[i]), verify=False)
            peers = {p.name: p.endpoint for p in self.boards[max(0, i - 1):i + 2] if p is not b
                     and p in self.stages}
            body = {"bundle": f"stage{i}", "stage": i, "n_stages": k, "n_mb": micro_batches,
                    "group": self.group, "mode": mode, "schedule": csv, "run": "r",
                    "peers": peers, "prev": self.boards[i - 1].name if i > 0 else None,
                    "next": self.boards[i + 1].name if i < k - 1 else None,
                    **(load_options or {})}
            wanted.add((b.name, self.send(b, Kind.LOAD, body=body)))
        got = self.collect(wanted)
        self.load_replies = {name: dict(m.header.body) for (name, _), m in got.items()}

    def upload(self, b: BoardProc, bundle: Path, name: str) -> None:
        """Upload a bundle directory to board `b` as `name` (no LOAD; forward-gradient clients
        load theirs with a FWDGRAD request, control/federated.py)."""
        self._upload(b, Path(bundle), name)

    def _upload(self, b: BoardProc, bundle: Path, name: str) -> None:
        if not (bundle / MANIFEST_FILE).is_file():
            raise ConfigError(f"{bundle} is not a stage bundle (no {MANIFEST_FILE})")
        wanted = set()
        for f in sorted(p for p in bundle.iterdir() if p.is_file()):
            seq = next(self._seq)
            last = seq
            for msg in chunk_file(f, name=f"{name}/{f.name}", seq=seq):
                self._send_msg(b, msg)
                last = msg.header.seq
            self._seq = itertools.count(last + 1)
            wanted.add((b.name, last))
        self.collect(wanted)

    # ---- training -------------------------------------------------------------------------------
    def _send_batches(self, step: int, micro: list[dict[str, np.ndarray]]) -> None:
        for i, b in enumerate(self.stages):
            assert b.manifest is not None
            names = [t.name for t in b.manifest.data_inputs if t.name != ACTIVATION]
            for j, batch in enumerate(micro):
                arrays = {n: np.ascontiguousarray(batch[n], np.int64) for n in names}
                self.send(b, Kind.BATCH, step=step, stage=i, mb=j, arrays=arrays)

    def _run(self, step: int, seeds: list[list[int]], hyper: list[list[float]]
             ) -> dict[int, float]:
        body = {"seeds": seeds, "hyper": hyper}
        wanted = {(b.name, self.send(b, Kind.STEP, step=step, body=body)) for b in self.stages}
        replies = self.collect(wanted)
        last = replies[next(k for k in wanted if k[0] == self.stages[-1].name)]
        self.last_step_replies = replies
        return {int(j): float(v) for j, v in last.header.body["losses"].items()}

    def check_plan_memory(self, bundle_dirs: list[Path | str], sched) -> list[dict[str, Any]]:
        """Refuse a plan whose stage footprints exceed the boards' budgets, before any upload.

        Footprint per stage = the board's own estimate (edgert.contract.estimate_footprint: weights,
        gradients, AdamW moments, saved activations x micro-batches in flight in this schedule);
        budgets come from the boards' PROFILE replies. Returns one row per board.
        """
        from edgert.contract import estimate_footprint
        from edgert.schedule import max_in_flight

        rows, over = [], []
        for i, d in enumerate(bundle_dirs):
            b = self.boards[i]
            m = load_manifest(Path(d), verify=False)
            fp = estimate_footprint(m, max_in_flight(sched, i))
            budget = self.request(b, Kind.PROFILE).header.body.get("budget")
            rows.append({"board": b.name, "stage": i, "footprint": fp["total"], "budget": budget})
            if budget is not None and fp["total"] > budget:
                over.append(rows[-1])
        if over:
            table = "; ".join(f"{r['board']} (stage {r['stage']}): needs {r['footprint'] / 2**20:.0f} MiB, "
                              f"budget {r['budget'] / 2**20:.0f} MiB" for r in over)
            raise ConfigError(f"the plan does not fit the boards' memory: {table}. Use more stages "
                              f"(--stages), fewer micro-batches in flight, or boards with larger budgets")
        return rows

    def train_step(self, micro_batches: list[dict[str, np.ndarray]], opt: OptimConfig) -> float:
        """One sync optimizer step over the micro-batches; returns their mean loss."""
        if self.mode != "sync" or len(micro_batches) != self.n_mb:
            raise ConfigError(f"train_step needs a sync deployment and {self.n_mb} micro-batches "
                              f"(deploy(..., micro_batches=M)); got {len(micro_batches)} in "
                              f"{self.mode} mode")
        self.step += 1
        self._send_batches(self.step, micro_batches)
        seeds = [seed_vec(step_seed(self.run_seed, self.step, j), True).tolist()
                 for j in range(self.n_mb)]
        losses = self._run(self.step, seeds, [opt.hyper(self.step).tolist()])
        return float(np.mean([losses[j] for j in range(self.n_mb)]))

    def train_async(self, micro_batches: list[dict[str, np.ndarray]], opt: OptimConfig
                    ) -> list[float]:
        """The whole async (2BW) run in one request; returns the loss of every micro-batch."""
        if self.mode != "async" or len(micro_batches) != self.n_mb:
            raise ConfigError(f"train_async needs an async deployment of {self.n_mb} "
                              f"micro-batches, got {len(micro_batches)} in {self.mode} mode")
        self._send_batches(1, micro_batches)
        seeds = [seed_vec(step_seed(self.run_seed, 1 + j // self.group, j % self.group),
                          True).tolist() for j in range(self.n_mb)]
        n_updates = -(-self.n_mb // self.group)
        losses = self._run(1, seeds, [opt.hyper(u).tolist() for u in range(1, n_updates + 1)])
        return [losses[j] for j in range(self.n_mb)]

    # ---- state and status -----------------------------------------------------------------------
    def params(self) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for b in self.stages:
            msg = self.request(b, Kind.STATE, body={"op": "get", "what": "params"})
            out.update({k: np.array(v) for k, v in msg.arrays().items()})
        return out

    def optimizer_state(self) -> dict[str, np.ndarray]:
        """AdamW moments as {"m/<param>": ..., "v/<param>": ...} (LocalPipeline's naming)."""
        out: dict[str, np.ndarray] = {}
        for b in self.stages:
            msg = self.request(b, Kind.STATE, body={"op": "get", "what": "optim"})
            out.update({k: np.array(v) for k, v in msg.arrays().items()})
        return out

    def load_state(self, params: dict[str, np.ndarray], opt: dict[str, np.ndarray] | None,
                   step: int) -> None:
        """Set weights (and AdamW moments) on every stage, resuming at optimizer step `step`."""
        wanted = set()
        for b in self.stages:
            assert b.manifest is not None
            names = [t.name for t in b.manifest.params]
            wanted.add((b.name, self.send(b, Kind.STATE, body={"op": "set", "what": "params"},
                                          arrays={n: params[n] for n in names})))
            if opt is not None:
                trained = [t.name for t in b.manifest.trainable]   # frozen params have no moments
                arrays = {f"{k}/{n}": opt[f"{k}/{n}"] for k in ("m", "v") for n in trained}
                wanted.add((b.name, self.send(b, Kind.STATE, arrays=arrays,
                                              body={"op": "set", "what": "optim", "step": step})))
        self.collect(wanted)
        self.step = step

    def fence(self) -> None:
        """From now on, ignore late ERROR replies to requests sent before this call (e.g. those of
        a step abandoned after a board was lost)."""
        self._fence = next(self._seq)

    def drop_boards(self, names: list[str]) -> None:
        """Forget lost boards (kill them if still running), so the survivors can be redeployed.

        The survivors keep their processes and links: a new `deploy` LOADs them in place (LOAD
        drops a half-run step and its queued messages on the board).
        """
        for b in [b for b in self.boards if b.name in names]:
            if b.proc.poll() is None:
                b.proc.kill()
            b.proc.wait()
            if b.proc.stdout is not None:
                b.proc.stdout.close()
            self.boards.remove(b)
            if b in self.stages:
                self.stages.remove(b)

    def profile(self, i: int = 0) -> dict[str, Any]:
        return dict(self.request(self.boards[i], Kind.PROFILE).header.body)

    def stats(self, i: int = 0) -> dict[str, Any]:
        return dict(self.request(self.boards[i], Kind.STATS).header.body)

    def pin(self, name: str, cores: set[int]) -> None:
        """Set the CPU affinity of every thread of board `name` (TVM's pool threads included)."""
        import os

        b = next(x for x in self.boards if x.name == name)
        for tid in os.listdir(f"/proc/{b.proc.pid}/task"):
            os.sched_setaffinity(int(tid), cores)

    def throttle(self, name: str, fraction: float, core: int | None = None) -> None:
        """Cap board `name` at `fraction` of one core (cgroup v1 CFS quota, control.cgroup.CpuCap),
        pinned to `core` if given; call again to change the cap. Simulates a board that slows down
        (its owner using it, thermal throttling)."""
        from control.cgroup import CpuCap

        b = next((x for x in self.boards if x.name == name), None)
        if b is None:
            raise ConfigError(f"no board {name!r} to throttle; boards: "
                              f"{[x.name for x in self.boards]}")
        if core is not None:
            self.pin(name, {core})
        key = f"{name}/cpu"            # closed with the memory caps in close()
        cap = self.cgroups.get(key)
        if cap is None:
            cap = CpuCap.create(name, fraction)
            self.cgroups[key] = cap    # type: ignore[assignment]
            cap.add(b.proc.pid)
        else:
            cap.set(fraction)  # type: ignore[attr-defined]

    def client(self, name: str) -> ZmqTransport:
        """A second controller-keyed client (identity `name`) for probes and fault tests."""
        return ZmqTransport(name, keys=self.keys, key_name=CONTROLLER, max_msg_bytes=-1)

    # ---- shutdown -------------------------------------------------------------------------------
    def close(self, timeout: float = 5.0) -> None:
        """SHUTDOWN every board, then kill what has not exited after `timeout` s."""
        if self._closed:
            return
        self._closed = True
        if self.t is not None:
            alive = [b for b in self.boards if b.proc.poll() is None]
            try:
                wanted = {(b.name, self.send(b, Kind.SHUTDOWN)) for b in alive}
                self.collect(wanted, timeout)
            except Exception as e:  # noqa: BLE001 - closing must not fail; we kill below
                log.warning("graceful shutdown incomplete: %s", e)
        for b in self.boards:
            try:
                b.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                log.warning("%s did not exit; killing pid %d", b.name, b.proc.pid)
                b.proc.kill()
                b.proc.wait()
            if b.proc.stdout is not None:
                b.proc.stdout.close()
        self._release()

    def _release(self) -> None:
        """Close the links, the telemetry subscriptions and the cgroups; drop our own workdir."""
        if self.t is not None:
            self.t.close()
        if self.telemetry is not None:
            self.telemetry.close()
        for cg in self.cgroups.values():
            try:
                cg.close()
            except ConfigError as e:
                log.warning("%s", e)
        if self._own_dir:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
