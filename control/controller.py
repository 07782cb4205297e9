"""The controller's side of the board protocol (edgert/board.py is the board's): N boards, however
they were started (local processes, control/cluster.py; running daemons, control/remote.py).

Deploy a K-stage plan in checked chunks, stream each micro-batch's side inputs to the stages that
take them, run steps, collect losses, read and set weights and AdamW moments. A sync step
reproduces the in-process runner (control/local.py) bit for bit: the seeds and AdamW hyper vectors
are computed here with control.local's functions (see edgert/executor.py,
[Note: seeds and hyper-parameters come from the controller]).
"""

from __future__ import annotations

import itertools
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from control.local import OptimConfig
from control.telemetry import TelemetryClient, reachable
from edgert.artifact import MANIFEST_FILE, Manifest, load_manifest
from edgert.contract import ACTIVATION, estimate_footprint, seed_vec, step_seed
from edgert.deploy import chunk_file
from edgert.errors import BoardError, ConfigError
from edgert.protocol import Kind, Message
from edgert.schedule import add_comms, add_step, async_1f1b, one_f_one_b, to_csv, validate
from edgert.transport import CONTROLLER, KeyRing, ZmqTransport

log = logging.getLogger(__name__)


@dataclass
class BoardHandle:
    """What the controller holds of one board: its name, endpoint, log and deployed manifest.

    `proc` is the board's `subprocess.Popen` when this controller started it, else a stand-in
    whose `poll()` is None (control/remote.py)."""

    name: str
    proc: Any
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


class BoardCluster:
    """The controller's links to N boards and the pipeline deployed on them.

    Subclasses say where the boards come from: `control.cluster.LocalCluster` starts them as local
    processes, `control.remote.AttachedCluster` attaches to running daemons. Jobs get one through
    `control.connect.open_cluster`.
    """

    def _setup(self, run_seed: int, timeout: float, workdir: Path | str | None) -> None:
        """The controller-side state every cluster starts with (no boards, no links yet)."""
        self.timeout = timeout                  # s per request
        self.run_seed = run_seed
        self.step = 0
        self.load_replies: dict[str, dict[str, Any]] = {}   # board -> its last LOAD reply body
        self.n_mb = 0
        self.mode = "sync"
        self.group = 0
        self.stages: list[BoardHandle] = []
        self.last_step_replies: dict[tuple[str, int], Message] = {}
        self._own_dir = workdir is None
        self.root = Path(tempfile.mkdtemp(prefix="edgert-cluster-") if workdir is None else workdir)
        self.keys: KeyRing
        self.boards: list[BoardHandle] = []
        self.t: ZmqTransport | None = None
        self._seq = itertools.count(1)
        self._fence = 0          # requests before the last fence(): late ERRORs are stale
        self._closed = False
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

    def _check_alive(self) -> None:
        """Raise BoardError if a board is known to be gone; only local processes can tell (a
        remote board's death shows as a request timeout)."""

    # ---- messaging ------------------------------------------------------------------------------
    def send(self, b: BoardHandle, kind: Kind, **kw: Any) -> int:
        seq = next(self._seq)
        self._send_msg(b, Message.make(kind, "", seq, **kw))
        return seq

    def _send_msg(self, b: BoardHandle, msg: Message) -> None:
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

    def request(self, b: BoardHandle, kind: Kind, timeout: float | None = None, **kw: Any
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

    def upload(self, b: BoardHandle, bundle: Path, name: str) -> None:
        """Upload a bundle directory to board `b` as `name` (no LOAD; forward-gradient clients
        load theirs with a FWDGRAD request, control/federated.py)."""
        self._upload(b, Path(bundle), name)

    def _upload(self, b: BoardHandle, bundle: Path, name: str) -> None:
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
            table = "; ".join(f"{r['board']} (stage {r['stage']}): needs "
                              f"{r['footprint'] / 2**20:.0f} MiB, budget "
                              f"{r['budget'] / 2**20:.0f} MiB" for r in over)
            raise ConfigError(f"the plan does not fit the boards' memory: {table}. Use more "
                              f"stages (--stages), fewer micro-batches in flight, or boards with "
                              f"larger budgets")
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

    @property
    def stage_names(self) -> list[str]:
        """The boards holding stage 0, 1, ... of the deployed plan."""
        return [b.name for b in self.stages]

    def client(self, name: str) -> ZmqTransport:
        """A second controller-keyed client (identity `name`) for probes and fault tests."""
        return ZmqTransport(name, keys=self.keys, key_name=CONTROLLER, max_msg_bytes=-1)

    # ---- shutdown -------------------------------------------------------------------------------
    def close(self, timeout: float = 5.0) -> None:
        """Drop the links (the boards keep running; LocalCluster stops its own)."""
        if not self._closed:
            self._closed = True
            self._release()

    def _release(self) -> None:
        """Close the links and the telemetry subscriptions; drop our own workdir."""
        if self.t is not None:
            self.t.close()
        if self.telemetry is not None:
            self.telemetry.close()
        if self._own_dir:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> BoardCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
