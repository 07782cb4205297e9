"""The board daemon (`BoardDaemon`): one process per board serving protocol requests with TVM's
runtime only.

    edgert serve --name board0 --port 5555 --keys keys/ --budget-mib 2048

The loop polls its transport with a timeout from the liveness tracker, answers every request, and
interleaves a running pipeline step (executor.StepRun) with everything else: a step that waits for
an ACT does not stop the board from answering HELLO or STATS. A handler that raises sends an ERROR
reply naming the request and the board keeps serving, whatever the request was (malformed frames
and a wrong protocol version included).

Requests and their replies, frame by frame: the table in edgert/protocol.py. LOAD refuses a
bundle over the board's memory budget before loading it (edgert.contract.estimate_footprint).

Telemetry (push). With a PUB socket bound (ZmqTransport.bind_pub; its endpoint is in the HELLO
reply), the board publishes a STATS message every `telemetry_s` seconds and right after each
finished step; its body is `telemetry_record()`: {board, pid, t (unix s), seq, interval (s), step
(last finished), steps, mode, stage, bundle, running, rss, peak_rss, budget (bytes), compute_s,
wait_s, step_s (last step, s), queue (inbox depth), errors, last_error}. Subscribers treat a board
silent for > 3 intervals as gone (control/telemetry.py).

Never imported here: the full `tvm` package, `compiler`, `control`, torch. The PROFILE reply
lists which of them are loaded so a test can check a running board.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgert.artifact import Manifest, load_manifest
from edgert.contract import estimate_footprint
from edgert.deploy import Reassembler
from edgert.errors import BoardError, ProtocolError, ScheduleError, TransportError
from edgert.executor import Inbox, OptimizerState, StepContext, StepPlan, StepRun, to_numpy
from edgert.head_split import executor as hsx
from edgert.liveness import Liveness
from edgert.procinfo import loaded_modules, memory_stats
from edgert.protocol import MAGIC, Kind, Message, error_reply
from edgert.schedule import Action, from_csv, max_in_flight
from edgert.transport import FrameError, Peer, Transport, peer_addresses

log = logging.getLogger(__name__)

MIB = 1 << 20


@dataclass(frozen=True, slots=True)
class BoardConfig:
    """How one board daemon runs."""

    name: str
    workdir: Path                     # deployed bundles land in workdir/<bundle>/
    budget_bytes: int | None = None   # refuse bundles whose estimated footprint exceeds this
    threads: int | None = None        # TVM worker threads (default: all cores)
    heartbeat_s: float = 1.0          # s between heartbeats to peers we have heard from
    liveness: int = 3                 # missed heartbeats before a peer counts as gone
    step_timeout_s: float = 120.0     # s a step may wait for one message before it fails
    telemetry_s: float = 1.0          # s between telemetry records (if a PUB socket is bound)
    backends: tuple[str, ...] = ("cpu",)   # what the board profile asks for (edgert/backends.py)


def check_budget(m: Manifest, in_flight: int, budget: int | None, where: str) -> dict[str, int]:
    """Raise BoardError with the numbers if the stage cannot fit the board's memory budget."""
    fp = estimate_footprint(m, in_flight)
    if budget is not None and fp["total"] > budget:
        raise BoardError(
            f"{where}: stage {m.index} needs an estimated {fp['total'] / MIB:.1f} MiB = "
            f"{fp['params'] / MIB:.1f} MiB weights + 3 x {fp['trained'] / MIB:.1f} MiB for the "
            f"trained ones (gradients, Adam m and v) + "
            f"{in_flight} micro-batch(es) in flight x {fp['saved_per_mb'] / MIB:.1f} MiB saved "
            f"activations, over this board's budget of {budget / MIB:.1f} MiB; it was not loaded. "
            f"Give this board fewer layers, run fewer micro-batches in flight, or raise "
            f"--budget-mib")
    return fp


@dataclass(slots=True)
class _Loaded:
    stage: Any                        # edgert.runtime.TvmStage
    line: list[Action | None]
    ctx: StepContext
    opt: OptimizerState
    footprint: dict[str, int]
    bundle: str = ""
    mode: str = "sync"


@dataclass(slots=True)
class _Running:
    run: StepRun
    peer: Peer                        # who asked for the step
    seq: int                          # its request seq


@dataclass(slots=True)
class _Stats:
    steps: int = 0
    errors: int = 0
    last_errors: deque[str] = field(default_factory=lambda: deque(maxlen=5))
    step_s: deque[float] = field(default_factory=lambda: deque(maxlen=50))
    compute_s: deque[float] = field(default_factory=lambda: deque(maxlen=50))


class BoardDaemon:
    """Serves one transport until SHUTDOWN. Nothing here opens sockets; `serve()` only polls."""

    def __init__(self, cfg: BoardConfig, transport: Transport,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.t = transport
        self.clock = clock
        self.live: Liveness[Peer] = Liveness(cfg.heartbeat_s, cfg.liveness)
        self.reasm = Reassembler(spool_dir=cfg.workdir)   # chunks go straight to disk
        self.inbox = Inbox()
        self.loaded: _Loaded | None = None
        self.running: _Running | None = None
        self.stats = _Stats()
        self.stopping = False
        self.fwd: Any = None                     # edgert.fwdgrad.ForwardClient, when loaded
        self._seq = 0
        self._tel_seq = 0
        self._last_step: dict[str, Any] = {}
        self._next_telemetry = clock()           # the first record goes out at once
        self._handlers: dict[Kind, Callable[[Peer, Message], None]] = {
            Kind.HELLO: self._hello, Kind.PROFILE: self._profile,
            Kind.DEPLOY_BEGIN: self._deploy, Kind.DEPLOY_CHUNK: self._deploy,
            Kind.DEPLOY_END: self._deploy, Kind.LOAD: self._load,
            Kind.BATCH: self._data, Kind.ACT: self._data, Kind.GRAD: self._data,
            Kind.STEP: self._step, Kind.STATE: self._state, Kind.STATS: self._stats,
            Kind.HEARTBEAT: lambda peer, msg: None, Kind.SHUTDOWN: self._shutdown,
            Kind.ERROR: self._peer_error, Kind.OK: lambda peer, msg: None,
            Kind.FWDGRAD: self._fwdgrad,
        }

    # ---- loop -----------------------------------------------------------------------------------
    def serve(self) -> None:
        log.info("board %s serving", self.cfg.name)
        while not self.stopping:
            self.poll_once()
        log.info("board %s stopped", self.cfg.name)

    def poll_once(self) -> None:
        now = self.clock()
        timeout = min(self.live.next_deadline(now), 0.25 if self.running else 1.0)
        if self.telemetry_endpoint is not None:
            timeout = max(0.0, min(timeout, self._next_telemetry - now))
        try:
            got = self.t.recv(timeout)
        except FrameError as e:
            self._fail(e.peer, -1, e.cause)
            got = None
        if got is not None:
            peer, msg = got
            self.live.on_traffic(peer, self.clock())
            self.handle(peer, msg)
        self._housekeeping(self.clock())

    def handle(self, peer: Peer, msg: Message) -> None:
        """Dispatch one message; any exception becomes an ERROR reply."""
        try:
            handler = self._handlers.get(msg.kind)
            if handler is None:
                served = sorted(k.value for k in self._handlers)
                raise ProtocolError(f"board {self.cfg.name} does not serve {msg.kind.value} "
                                    f"requests; it serves {served}")
            handler(peer, msg)
        except Exception as e:  # noqa: BLE001 - the board must outlive any bad request
            self._fail(peer, msg.header.seq, e)

    def _housekeeping(self, now: float) -> None:
        for peer in self.live.due_heartbeats(now):
            if isinstance(peer, bytes):       # only clients of our ROUTER; links are one-way
                try:
                    self.t.send(peer, Message.make(Kind.HEARTBEAT, "", self._next_seq()))
                except TransportError:
                    self.live.remove(peer)
        self.live.expired(now)
        if self.telemetry_endpoint is not None and now >= self._next_telemetry:
            self.publish_telemetry()
        if self.running is not None:
            try:
                self.running.run.fail_if_stuck(self.cfg.step_timeout_s, now)
            except TransportError as e:
                self._abort_step(e)

    # ---- telemetry ------------------------------------------------------------------------------
    @property
    def telemetry_endpoint(self) -> str | None:
        return getattr(self.t, "pub_endpoint", None)

    def telemetry_record(self) -> dict[str, Any]:
        ld, s, last = self.loaded, self.stats, self._last_step
        return {"board": self.cfg.name, "pid": os.getpid(), "t": time.time(),
                "seq": self._tel_seq, "interval": self.cfg.telemetry_s,
                "step": last.get("step"), "steps": s.steps,
                "mode": None if ld is None else ld.mode,
                "stage": None if ld is None else ld.ctx.stage,
                "bundle": None if ld is None else ld.bundle,
                "running": None if self.running is None else self.running.run.blocked_on,
                **memory_stats(), "budget": self.cfg.budget_bytes,
                "compute_s": last.get("compute_s"), "wait_s": last.get("wait_s"),
                "step_s": last.get("seconds"), "queue": len(self.inbox), "errors": s.errors,
                "last_error": s.last_errors[-1] if s.last_errors else None,
                "head_split": hsx.report()}

    def publish_telemetry(self) -> None:
        """Push one record now and restart the interval (a failure is logged, never raised)."""
        publish = getattr(self.t, "publish", None)
        self._next_telemetry = self.clock() + self.cfg.telemetry_s
        if publish is None:
            return
        self._tel_seq += 1
        try:
            publish(Message.make(Kind.STATS, "", self._tel_seq, body=self.telemetry_record()))
        except Exception as e:  # noqa: BLE001 - monitoring must never stop the board
            log.warning("board %s: telemetry not sent: %s", self.cfg.name, e)

    # ---- replies --------------------------------------------------------------------------------
    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def reply(self, peer: Peer, kind: Kind, ref_seq: int, body: Mapping[str, Any] | None = None,
              arrays: Mapping[str, np.ndarray] | None = None) -> None:
        run = self.loaded.ctx.run if self.loaded else ""
        self.t.send(peer, Message.make(kind, run, self._next_seq(),
                                       body={**(body or {}), "ref_seq": ref_seq}, arrays=arrays))

    def _fail(self, peer: Peer, ref_seq: int, e: BaseException) -> None:
        self.stats.errors += 1
        self.stats.last_errors.append(f"{type(e).__name__}: {e}")
        log.warning("board %s: request %d from %r failed: %s", self.cfg.name, ref_seq, peer, e)
        try:
            self.t.send(peer, error_reply("", self._next_seq(), e, ref_seq))
        except Exception as e2:  # noqa: BLE001 - the client may be gone or unroutable
            log.warning("board %s: cannot send ERROR to %r: %s", self.cfg.name, peer, e2)

    # ---- handlers -------------------------------------------------------------------------------
    def _hello(self, peer: Peer, msg: Message) -> None:
        self.reply(peer, Kind.HELLO, msg.header.seq, {
            "board": self.cfg.name, "pid": os.getpid(), "protocol": MAGIC.decode(),
            "caps": {"modes": ["sync", "async"], "loaded": self.loaded is not None},
            "telemetry": self.telemetry_endpoint})

    def profile(self) -> dict[str, Any]:
        from importlib.metadata import PackageNotFoundError, version

        rt = {}
        for pkg in ("apache-tvm", "apache-tvm-ffi"):
            try:
                rt[pkg] = version(pkg)
            except PackageNotFoundError:
                rt[pkg] = None
        return {"board": self.cfg.name, "cores": len(os.sched_getaffinity(0)),
                "threads": self.cfg.threads, **memory_stats(), "budget": self.cfg.budget_bytes,
                "runtime": rt, "modules": loaded_modules(),
                "stage": None if self.loaded is None else self.loaded.ctx.stage,
                "backends": self.backends(), "head_split": hsx.report()}

    def backends(self) -> dict[str, Any]:
        """Probed once, in a child process, on first use (see edgert/backends.py)."""
        if getattr(self, "_backends", None) is None:
            from edgert import backends

            report = backends.probe()
            use, notes = backends.resolve(self.cfg.backends, report)
            for n in notes:
                log.warning("board %s: %s", self.cfg.name, n)
            self._backends = {"requested": list(self.cfg.backends), "use": use, "notes": notes,
                              "usable": report.get("usable", {}), "cpu": report.get("cpu", {})}
        return self._backends

    def _profile(self, peer: Peer, msg: Message) -> None:
        self.reply(peer, Kind.PROFILE, msg.header.seq, self.profile())

    def _deploy(self, peer: Peer, msg: Message) -> None:
        done = self.reasm.feed(msg)
        if done is None:
            return
        path = self.cfg.workdir / done.name
        path.parent.mkdir(parents=True, exist_ok=True)
        if done.path is not None:             # spooled chunk by chunk (workdir/<name>.part)
            size = done.path.stat().st_size
            done.path.replace(path)
        else:
            size = len(done.data)
            tmp = path.with_name(path.name + ".part")
            tmp.write_bytes(done.data)
            tmp.replace(path)
        self.reply(peer, Kind.OK, msg.header.seq,
                   {"name": done.name, "sha256": done.sha256, "bytes": size})

    def _load(self, peer: Peer, msg: Message) -> None:
        b = msg.header.body
        bundle = self._bundle_dir(b.get("bundle"))
        stage = _int(b, "stage", 0)
        n_stages, n_mb, group = _int(b, "n_stages", 1), _int(b, "n_mb", 1), _int(b, "group", 0)
        schedule = from_csv(str(b.get("schedule", "")))
        if sorted(schedule) != list(range(n_stages)):
            raise ScheduleError(f"load: the schedule has {len(schedule)} stage rows, expected "
                                f"{n_stages}")
        m = load_manifest(bundle)        # sha256 of every file, target fits this machine
        if m.index != stage or int(m.stage["num_stages"]) != n_stages:
            raise BoardError(f"load: {bundle.name} is stage {m.index} of "
                             f"{m.stage['num_stages']}, the request says {stage} of {n_stages}")
        line = schedule[stage]
        fp = check_budget(m, max_in_flight(schedule, stage), self.cfg.budget_bytes,
                          f"board {self.cfg.name}")
        split_opts = hsx.SplitOptions.from_body(m, b)   # bad options fail before any change
        from edgert.runtime import TvmStage   # only now: a refused bundle never loads TVM

        self.loaded = None                    # free the previous stage first
        self.running = None
        hsx.install(None)                     # and its head-split workers
        st = TvmStage.load(bundle, threads=self.cfg.threads, verify=False, block_torch=True)
        split = None if split_opts is None else hsx.start_for_stage(
            bundle, m, split_opts, board=self.cfg.name, threads=self.cfg.threads)
        peers = peer_addresses(b.get("peers", {}))
        for link, addr in peers.items():
            self.t.connect(link, addr)    # link name = the peer board's name = its key name
        ctx = StepContext(stage, n_stages, n_mb, str(b.get("run", "")),
                          prev=b.get("prev"), next=b.get("next"), group=group)
        self.loaded = _Loaded(st, line, ctx, OptimizerState(st), fp, bundle.name,
                              str(b.get("mode", "sync")))
        self.inbox = Inbox()
        self.reply(peer, Kind.OK, msg.header.seq, {"footprint": fp, "head_split": split,
                                                   **memory_stats()})

    def _bundle_dir(self, name: Any) -> Path:
        if not isinstance(name, str) or not name or "/" in name or name in (".", ".."):
            raise BoardError(f"load: body 'bundle' must name a deployed bundle directory, "
                             f"got {name!r}")
        return self.cfg.workdir / name

    def _need_loaded(self, what: str) -> _Loaded:
        if self.loaded is None:
            raise BoardError(f"{what}: board {self.cfg.name} has no stage loaded; send LOAD first")
        return self.loaded

    def _data(self, peer: Peer, msg: Message) -> None:
        self.inbox.put(msg)
        self._advance()

    def _step(self, peer: Peer, msg: Message) -> None:
        ld = self._need_loaded("step")
        if self.running is not None:
            raise BoardError(f"step {msg.header.step}: step {self.running.run.plan.step} is still "
                             f"running; wait for its reply")
        plan = StepPlan.from_body(msg.header.step, dict(msg.header.body), ld.ctx.n_mb)
        run = StepRun(ld.line, ld.stage, ld.opt, ld.ctx, plan, self.t.send)
        self.running = _Running(run, peer, msg.header.seq)
        self._advance()

    def _advance(self) -> None:
        r = self.running
        if r is None:
            return
        try:
            done = r.run.advance(self.inbox)
        except Exception as e:  # noqa: BLE001 - report to whoever asked for the step
            self._abort_step(e)
            return
        if done:
            self.running = None
            res = r.run.result
            self.stats.steps += 1
            self.stats.step_s.append(res.seconds)
            self.stats.compute_s.append(res.compute_s)
            self._last_step = {"step": res.step, "compute_s": res.compute_s,
                               "wait_s": res.wait_s, "seconds": res.seconds}
            self.reply(r.peer, Kind.OK, r.seq, {
                "step": res.step, "losses": {str(k): v for k, v in res.losses.items()},
                "seconds": res.seconds, "compute_s": res.compute_s, "wait_s": res.wait_s,
                "max_versions": res.max_versions, **memory_stats()})
            if self.telemetry_endpoint is not None:
                self.publish_telemetry()

    def _abort_step(self, e: BaseException) -> None:
        r = self.running
        self.running = None
        if r is not None:
            self.inbox.drop_before(r.run.plan.step + 1)
            self._fail(r.peer, r.seq, e)

    def _state(self, peer: Peer, msg: Message) -> None:
        ld = self._need_loaded("state")
        b = msg.header.body
        op, what = b.get("op", "get"), b.get("what", "params")
        names = [t.name for t in ld.stage.manifest.params]
        tnames = [t.name for t in ld.stage.manifest.trainable]   # frozen params have no moments
        if op == "get" and what == "params":
            arrays = ld.stage.params_numpy()
        elif op == "get" and what == "optim":
            arrays = {f"{k}/{n}": np.array(to_numpy(a)) for k, lst in (("m", ld.opt.m),
                      ("v", ld.opt.v)) for n, a in zip(tnames, lst, strict=True)}
        elif op == "set" and what == "params":
            ld.stage.set_params(_need(msg.arrays(), names, "state set params"))
            arrays = None
        elif op == "set" and what == "optim":
            from edgert.runtime import to_dev

            got = msg.arrays()
            m = _need(got, [f"m/{n}" for n in tnames], "state set optim")
            v = _need(got, [f"v/{n}" for n in tnames], "state set optim")
            ld.opt.m = [to_dev(np.array(m[f"m/{n}"])) for n in tnames]
            ld.opt.v = [to_dev(np.array(v[f"v/{n}"])) for n in tnames]
            ld.opt.steps = _int(b, "step", ld.opt.steps)
            arrays = None
        else:
            raise BoardError(f"state: op={op!r} what={what!r} is not served; use op 'get' or "
                             f"'set' with what 'params' or 'optim'")
        kind = Kind.STATE if arrays is not None else Kind.OK
        self.reply(peer, kind, msg.header.seq, {"what": what, "step": ld.opt.steps}, arrays)

    def stats_body(self) -> dict[str, Any]:
        s = self.stats
        return {"board": self.cfg.name, "steps": s.steps, "errors": s.errors,
                "last_errors": list(s.last_errors), "step_s": list(s.step_s),
                "compute_s": list(s.compute_s), "queue_depth": len(self.inbox),
                "running": None if self.running is None else self.running.run.blocked_on,
                "head_split": hsx.report(), **memory_stats()}

    def _stats(self, peer: Peer, msg: Message) -> None:
        self.reply(peer, Kind.STATS, msg.header.seq, self.stats_body())

    def _peer_error(self, peer: Peer, msg: Message) -> None:
        """A neighbour refused something we sent it: never answer (no ERROR ping-pong)."""
        b = msg.header.body
        text = f"{peer!r} reported {b.get('type')}: {b.get('message')}"
        log.warning("board %s: %s", self.cfg.name, text)
        self.stats.errors += 1
        self.stats.last_errors.append(text)
        if self.running is not None:
            self._abort_step(BoardError(f"step aborted: {text}"))

    def _fwdgrad(self, peer: Peer, msg: Message) -> None:
        """Forward-gradient client requests: load, shard, round (edgert/fwdgrad.py)."""
        from edgert.fwdgrad import serve_request
        from edgert.runtime import TvmStage

        def load(name: Any) -> TvmStage:
            return TvmStage.load(self._bundle_dir(name), threads=self.cfg.threads, block_torch=True)

        self.fwd, body = serve_request(self.fwd, msg.header.body, msg.arrays(), load)
        self.reply(peer, Kind.OK, msg.header.seq, {**body, **memory_stats()})

    def _shutdown(self, peer: Peer, msg: Message) -> None:
        self.stopping = True
        self.reply(peer, Kind.OK, msg.header.seq, {"board": self.cfg.name})


def _need(arrays: Mapping[str, np.ndarray], names: list[str], what: str
          ) -> dict[str, np.ndarray]:
    missing = [n for n in names if n not in arrays]
    if missing:
        raise BoardError(f"{what}: missing tensors {missing[:5]} ({len(missing)} in all); send "
                         f"every tensor of the stage, named as in its manifest")
    return {n: np.array(arrays[n]) for n in names}


def _int(body: Mapping[str, Any], key: str, default: int) -> int:
    v = body.get(key, default)
    if type(v) is not int or v < 0:
        raise BoardError(f"load: body field {key!r} must be an integer >= 0, got {v!r}")
    return v
