"""The one host training loop: every fine-tuning job steps through `Loop.run`.

    with open_cluster(ClusterConfig(boards=2)) as cluster:             # control/connect.py
        loop = Loop(job, Dense(compile_fn), cluster, LoopConfig(steps=60))
        loop.run([(0, 3), (3, 6)])

What differs between jobs plugs in from outside, so the loop never branches on a job's kind:

    job      the data order, the optimizer schedule, held-out evaluation (control/job.py for BERT
             classification, control/decoder.py for causal LMs); see `Job`
    mode     what is compiled, how deployed weights map to the dense layout, what a checkpoint
             carries, what happens at a step boundary (control/modes.py; FAR: control/far.py)
    cluster  where the stages run: K executors in this process or K boards (control/connect.py)
    config   checkpoints (a run directory), evaluation cadence, board events, recovery

One step: the job's micro-batches of step s -> `cluster.train_step` (the boards, or the executors
in process) -> a `step` event. After it: board events, checkpoints, evaluation, live re-planning,
each when due. A lost board (BoardError) is recovered from the last checkpoint when the job has
checkpoints (see [Note: recovery] in control/run.py); without them the error ends the job.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from control import checkpoint as ckpt
from control.events import EventLog
from control.local import LocalPipeline, OptimConfig
from control.replan import Planner
from edgert.errors import BoardError, TransportError

log = logging.getLogger(__name__)
PROBE_S = 10.0        # a live board process that does not answer HELLO within this is lost
Params = dict[str, np.ndarray]


class Job(Protocol):
    """What a job gives the loop (control/job.py `Job`, control/decoder.py `LmJob`)."""

    opt: OptimConfig
    batch: int
    micro_batches: int

    def micro(self, step: int) -> list[dict[str, np.ndarray]]:
        """The micro-batches of optimizer step `step` (1-based): a pure function of the step."""
        ...

    def evaluate(self, pipe: LocalPipeline) -> dict[str, Any]:
        """Held-out metrics of the stages in `pipe` (dropout off): loss and the job's own."""
        ...

    def position(self, step: int) -> dict[str, int]:
        """Where the data order stands after `step` steps (recorded in checkpoints)."""
        ...


class Mode(Protocol):
    """How a kind of fine-tuning plugs into the loop (control/modes.py)."""

    def compile(self, split: str, out: Path) -> list[Path]:
        """The stage bundles of `split` ("0:3,3:6") in the current layout (`out`: where the
        dense layout's go); from the compile cache when possible."""
        ...

    def dense(self, params: Params) -> Params:
        """Weights of the deployed stages in the model's dense layout (for export)."""
        ...

    def to_deployed(self, params: Params) -> Params:
        """Dense-layout weights in the layout of the deployed stages."""
        ...

    def checkpoint_meta(self) -> dict[str, Any]:
        """What a checkpoint carries besides weights and moments (e.g. FAR's plan)."""
        ...

    def restore(self, meta: dict[str, Any] | None) -> None:
        """Take the layout of a checkpoint being loaded (None: a fresh start)."""
        ...

    def at_boundary(self, loop: Loop) -> bool:
        """Called before every step; True if it redeployed (the loop re-checks its conditions)."""
        ...


@dataclass(frozen=True)
class LoopConfig:
    """How often the loop does what, besides stepping."""

    steps: int
    checkpoint_dir: Path | None = None   # None: no checkpoints, and a lost board ends the job
    checkpoint_every: int = 10
    keep_checkpoints: int = 2
    eval_every: int = 0                  # held-out evaluation every N steps (always at 0, end)
    board_every: int = 0                 # board events every N steps (0: at the end only)
    max_recoveries: int = 3
    budget_mib: float = 0.0              # reported in board events (0 = unlimited)
    run_seed: int = 0
    where: str = "job"                   # how alerts and errors name this job (its run dir)


class RunAborted(BoardError):
    """Recovery is impossible or has been tried `max_recoveries` times."""


class Loop:
    """Steps `job` on `cluster` to `cfg.steps` (or until `stop` is set); see the module docstring.

    `bundle_dir(split)` says where the dense bundles of a split go; `meta` is added to every
    checkpoint's meta.json; `planner` (control.replan.Planner) re-plans over the survivors after a
    lost board and, if its drift watch is on, live when boards slow down. `on_state(state, **kw)`
    receives every state change (default: a `state` event).
    """

    def __init__(self, job: Job, mode: Mode, cluster: Any, cfg: LoopConfig, *,
                 bundle_dir: Callable[[str], Path], events: EventLog | None = None,
                 meta: dict[str, Any] | None = None, planner: Planner | None = None,
                 on_state: Callable[..., None] | None = None,
                 stop: threading.Event | None = None,
                 unpaused: threading.Event | None = None) -> None:
        self.job, self.mode, self.cluster, self.cfg = job, mode, cluster, cfg
        self.bundle_dir, self.meta, self.planner = bundle_dir, dict(meta or {}), planner
        self.events = events if events is not None else EventLog()
        self.on_state = on_state or (lambda state, **kw: self.events.emit(
            "state", state=state, step=self.step, **kw))
        self.stop = stop or threading.Event()
        self.unpaused = unpaused or threading.Event()
        if unpaused is None:
            self.unpaused.set()
        self.state = "created"
        self.step = 0
        self.ranges: list[tuple[int, int]] = []
        self.bundles: list[Path] = []
        self.recoveries: list[dict[str, Any]] = []
        self.replans: list[dict[str, Any]] = []
        self.attempts = 0                 # recovery attempts, successful or not

    # ---- the loop -------------------------------------------------------------------------------
    def run(self, ranges: list[tuple[int, int]], checkpoint: ckpt.Checkpoint | None = None) -> None:
        """Deploy `ranges` (loading `checkpoint` if given), evaluate, train to the end or a stop."""
        self.deploy(ranges, "resume" if checkpoint else "start", checkpoint)
        if checkpoint is None:   # no checkpoint 0: a failure before the first one restarts at 0
            self.evaluate(None)
        self.set_state("running")
        self._steps()
        if self.step >= self.cfg.steps:
            self.set_state("finished")
            return
        if self.state != "stopping":              # stopped: make sure the stop point is on disk
            self.set_state("stopping")
        if self.cfg.checkpoint_dir is not None:
            last = ckpt.list_steps(self.cfg.checkpoint_dir)
            if not last or last[-1] != self.step:
                self.checkpoint(*self.gather(True))
        self.set_state("stopped", note=f"resume with: edgert resume {self.cfg.where}")

    def _steps(self) -> None:
        high = self.step          # the furthest step reached (steps past a checkpoint are redone)
        while self.step < self.cfg.steps and not self.stop.is_set():
            if not self.unpaused.is_set():
                self.set_state("paused")
                self.unpaused.wait()
                self.set_state("stopping" if self.stop.is_set() else "running")
                continue
            try:
                if self.mode.at_boundary(self):
                    continue
                self.one_step()
                high = max(high, self.step)
                self.after_step()
                if self.step < self.cfg.steps:
                    self.maybe_replan()
            except (BoardError, TransportError) as e:
                if self.cfg.checkpoint_dir is None:
                    raise
                self.recover_until_done(e, high)

    def one_step(self) -> None:
        s, job = self.step + 1, self.job
        micro = job.micro(s)
        t0 = time.perf_counter()
        loss = self.cluster.train_step(micro, job.opt)
        dt = time.perf_counter() - t0
        self.step = s
        self.events.emit("step", step=s, loss=loss, step_s=dt, lr=job.opt.lr_at(s),
                         seq_per_s=job.batch * job.micro_batches / dt)

    def after_step(self) -> None:
        cfg, s = self.cfg, self.step
        if (cfg.board_every and s % cfg.board_every == 0) or s == cfg.steps:
            self.board_events()
        want_ckpt = cfg.checkpoint_dir is not None and (s % cfg.checkpoint_every == 0
                                                        or s == cfg.steps)
        want_eval = (cfg.eval_every and s % cfg.eval_every == 0) or s == cfg.steps
        if want_ckpt or want_eval:
            params, opt = self.gather(want_ckpt)
            if want_ckpt:
                self.checkpoint(params, opt)
            if want_eval:
                self.evaluate(params)

    def set_state(self, state: str, **kw: Any) -> None:
        self.state = state
        self.on_state(state, **kw)

    def alert(self, level: str, text: str) -> None:
        (log.warning if level != "info" else log.info)("%s: %s", self.cfg.where, text)
        self.events.emit("alert", level=level, text=text)

    # ---- deployment and state -------------------------------------------------------------------
    def deploy(self, ranges: list[tuple[int, int]], reason: str, c: ckpt.Checkpoint | None,
               state: tuple[Params, Params, int] | None = None) -> dict[str, float]:
        """Compile (from the cache when possible) and load `ranges` on the first boards; then load
        checkpoint `c`, or the live `state` (params, AdamW moments, step) of a migration, or start
        from the bundles' initial weights at step 0. Returns the seconds each part took."""
        t0 = time.perf_counter()
        if c is not None or state is None:      # a live migration keeps the current layout
            self.mode.restore(c.meta if c is not None else None)
        split = ",".join(f"{a}:{b}" for a, b in ranges)
        bundles = self.mode.compile(split, self.bundle_dir(split))
        t1 = time.perf_counter()
        self.cluster.deploy(bundles, micro_batches=self.job.micro_batches)
        t2 = time.perf_counter()
        if c is not None:
            params, opt = c.load(dense=False)     # the deployed layout, as it was saved
            state = (params, opt, c.step)
        if state is not None:
            self.cluster.load_state(*state)
        t3 = time.perf_counter()
        self.step = state[2] if state is not None else 0
        if self.planner is not None:
            self.planner.watch.reset(deployed=True, decided=reason == "re-plan")
        self.ranges, self.bundles = list(ranges), list(bundles)
        speeds = self.planner.speeds if self.planner is not None else {}
        self.events.emit("plan", ranges=[list(r) for r in ranges], mode="sync", reason=reason,
                         boards=self.cluster.stage_names, micro_batches=self.job.micro_batches,
                         **({"speeds": dict(speeds)} if speeds else {}))
        return {"compile_s": t1 - t0, "deploy_s": t2 - t1, "load_checkpoint_s": t3 - t2}

    def gather(self, with_opt: bool) -> tuple[Params, Params]:
        """Weights (and AdamW moments) from the stages, in the deployed layout."""
        params = self.cluster.params()
        return params, (self.cluster.optimizer_state() if with_opt else {})

    def checkpoint(self, params: Params, opt: Params) -> None:
        """A consistent checkpoint at this step boundary (see control/checkpoint.py)."""
        cfg = self.cfg
        assert cfg.checkpoint_dir is not None
        t0 = time.perf_counter()
        names = [[t.name for t in b.manifest.params] for b in self.cluster.stages]
        meta = {"run_seed": cfg.run_seed, "data": self.job.position(self.step),
                "rng": {"dropout": "edgert.contract.step_seed(run_seed, step, micro_batch)",
                        "data_order": "numpy default_rng([seed, epoch]).permutation",
                        "next_step": self.step + 1},
                "plan": {"ranges": [list(r) for r in self.ranges],
                         "boards": self.cluster.stage_names},
                **self.meta, **self.mode.checkpoint_meta()}
        c = ckpt.write(cfg.checkpoint_dir, self.step, names, params, opt, meta,
                       keep=cfg.keep_checkpoints)
        self.events.emit("checkpoint", step=self.step, path=str(c.path),
                         seconds=time.perf_counter() - t0)

    def evaluate(self, params: Params | None) -> dict[str, Any]:
        """Held-out metrics in this process (dropout off) on the given weights (None: the
        deployed bundles' own): on the stages themselves when they run here, else on a copy."""
        if isinstance(self.cluster, LocalPipeline):
            res = self.job.evaluate(self.cluster)
        else:
            pipe = LocalPipeline(self.bundles, run_seed=self.cfg.run_seed)
            if params is not None:
                pipe.load_state(params, None, self.step)
            res = self.job.evaluate(pipe)
            del pipe                  # the boards hold the model; this process only to evaluate
        self.events.emit("eval", step=self.step, **res)
        return res

    def board_events(self) -> None:
        from edgert.head_split.executor import second_backend_heads

        c, budget = self.cluster, self.cfg.budget_mib or None
        for i, b in enumerate(c.boards):
            st = c.stats(i)
            comp = st.get("compute_s") or [None]
            self.events.emit("board", name=b.name, stage=i if i < len(c.stages) else None,
                             rss_mib=st["rss"] / 2**20, peak_rss_mib=st["peak_rss"] / 2**20,
                             budget_mib=budget, compute_s=comp[-1], queue=st.get("queue_depth"),
                             errors=st.get("errors"), alive=True, pid=b.proc.pid,
                             head_split=second_backend_heads(st.get("head_split")))

    # ---- recovery (see [Note: recovery] in control/run.py) --------------------------------------
    def recover_until_done(self, error: BaseException, high: int) -> None:
        """`recover`; a board lost during the recovery itself starts another one."""
        while True:
            try:
                self.recover(error, high)
                return
            except RunAborted:
                raise
            except (BoardError, TransportError) as e:
                error = e

    def recover(self, error: BaseException, high: int) -> None:
        """Re-plan over the surviving boards and continue from the last checkpoint (by itself)."""
        cfg = self.cfg
        t0 = time.perf_counter()
        first = str(error).splitlines()[0]
        self.alert("error", f"step {self.step + 1} failed: {first}")
        self.attempts += 1
        if self.attempts > cfg.max_recoveries:
            raise RunAborted(f"giving up after {self.attempts - 1} recovery attempts "
                             f"(max_recoveries = {cfg.max_recoveries}); last failure: {first}. "
                             f"Check the boards' logs in {self.cluster.root}, then `edgert "
                             f"resume {cfg.where}`") from error
        lost = find_lost(self.cluster)
        for name in lost:
            self.events.emit("board", name=name, alive=False, stage=None)
        survivors = [b.name for b in self.cluster.boards]
        if not survivors:
            raise RunAborted(f"every board is lost ({lost}); restart the boards and continue "
                             f"with `edgert resume {cfg.where}`") from error
        k = min(len(self.ranges), len(survivors))
        ranges = self.ranges
        if k != len(self.ranges):
            if self.planner is None:
                raise RunAborted(f"{lost} lost and no planner to re-split the model over "
                                 f"{survivors}") from error
            p = self.planner.plan_over(survivors[:k])
            log.info("plan over %s:\n%s", survivors[:k], p.explain())
            ranges = p.ranges
        t_plan = time.perf_counter()
        c = ckpt.latest(cfg.checkpoint_dir, warn=lambda t: self.alert("warning", t))
        t_verify = time.perf_counter()
        parts = self.deploy(ranges, "board lost" if lost else "re-plan", c)
        start = c.step if c is not None else 0
        rec = {"failed_step": high + 1, "lost": lost, "from_checkpoint": start,
               "steps_redone": high - start, "ranges": [list(r) for r in ranges],
               "boards": survivors[:k], "seconds": time.perf_counter() - t0,
               "probe_plan_s": t_plan - t0, "verify_checkpoint_s": t_verify - t_plan, **parts}
        self.recoveries.append(rec)
        self.alert("warning" if lost else "info",
                   f"recovered in {rec['seconds']:.1f} s: lost {lost or 'no board'}; now {k} "
                   f"stage(s) {ranges} on {survivors[:k]}; from checkpoint step {start}, redoing "
                   f"{high - start} step(s)")

    # ---- live re-planning (see [Note: speed drift] in control/replan.py) ------------------------
    def maybe_replan(self) -> bool:
        """Measure drift after this step; re-plan and migrate live when it persists (True if
        moved)."""
        p = self.planner
        if p is None or not p.watching(len(self.ranges)):
            return False
        d = p.observe(self.cluster.stage_names, self.ranges, stage_compute_s(self.cluster))
        if d is None:
            return False
        if not d.move:
            self.alert("info", f"step {self.step}: speed drift, no better split: {d.why}")
            return False
        self.alert("warning", f"step {self.step}: speed drift, re-planning live: {d.why}")
        self.migrate(d.proposed.ranges, d.why)
        return True

    def migrate(self, ranges: list[tuple[int, int]], why: str) -> None:
        """Move to `ranges` without restarting: weights and AdamW moments from the boards at this
        step boundary, compile (cached), LOAD in place, set the state, continue at the same step."""
        t0 = time.perf_counter()
        step, old = self.step, list(self.ranges)
        params, opt = self.gather(True)
        t1 = time.perf_counter()
        parts = self.deploy(ranges, "re-plan", None, (params, opt, step))
        rec = {"step": step, "from": [list(x) for x in old], "to": [list(x) for x in ranges],
               "why": why, "speeds": dict(self.planner.speeds if self.planner else {}),
               "seconds": time.perf_counter() - t0, "gather_s": t1 - t0, **parts}
        self.replans.append(rec)
        log.info("re-planned at step %d: %s -> %s in %.1f s", step, old, ranges, rec["seconds"])


def find_lost(cluster: Any) -> list[str]:
    """Boards whose process has exited, then boards that do not answer HELLO within PROBE_S."""
    from edgert.protocol import Kind

    cluster.fence()           # the failed step's late ERRORs must not condemn a survivor
    dead = [b.name for b in cluster.boards if b.proc.poll() is not None]
    cluster.drop_boards(dead)
    hung = []
    for b in list(cluster.boards):
        try:
            cluster.request(b, Kind.HELLO, timeout=PROBE_S)
        except BoardError:
            hung.append(b.name)
    cluster.drop_boards(hung)
    return dead + hung


def stage_compute_s(cluster: Any) -> list[float]:
    """Each stage board's compute seconds in the last step: from its step reply, else STATS."""
    from edgert.protocol import Kind

    replies = {name: m.header.body for (name, _), m in cluster.last_step_replies.items()}
    out = []
    for b in cluster.stages:
        t = replies.get(b.name, {}).get("compute_s")
        if t is None:
            comp = cluster.request(b, Kind.STATS).header.body.get("compute_s") or [None]
            t = comp[-1]
        if t is None:
            raise BoardError(f"{b.name} reports no compute time for its last step")
        out.append(float(t))
    return out


def stage_boards(cluster: Any) -> list[dict[str, Any]]:
    """Each stage board's name, stage, pid, endpoint, peak RSS (MiB) and head split, from STATS
    (for a job's report; in process: none)."""
    out = []
    for i, b in enumerate(cluster.stages if cluster.boards else []):
        st = cluster.stats(i)
        out.append({"name": b.name, "stage": i, "pid": b.proc.pid, "endpoint": b.endpoint,
                    "peak_rss_mib": st["peak_rss"] / 2 ** 20, "head_split": st.get("head_split")})
    return out
