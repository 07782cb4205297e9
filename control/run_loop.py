"""The training loop of a `control.run.Run`: deploy, steps, checkpoints, evaluation and recovery.

See [Note: recovery] in control/run.py for what happens when a board is lost.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from control import checkpoint as ckpt
from control import far_run
from edgert.errors import BoardError, ConfigError, TransportError

if TYPE_CHECKING:
    from control.run import Run

log = logging.getLogger(__name__)
PROBE_S = 10.0        # a live board process that does not answer HELLO within this is lost


@dataclass
class Job:
    """What the loop needs, prepared once: model, data, optimizer, planner costs."""

    model: Any                  # control.job.Model
    train_enc: dict[str, np.ndarray]
    train_y: np.ndarray
    test_batches: list[dict[str, np.ndarray]]
    opt: Any                    # control.local.OptimConfig
    costs: Any                  # control.partition.ModelCosts
    batch: int
    micro_batches: int
    seed: int

    @property
    def per_epoch(self) -> int:
        return len(self.train_y) // self.batch

    def position(self, step: int) -> dict[str, int]:
        """Where the data order stands after `step` optimizer steps."""
        done = step * self.micro_batches
        epoch, pos = divmod(done, self.per_epoch)
        return {"epoch": epoch, "position": pos, "batches_done": done}

    def micro(self, step: int) -> list[dict[str, np.ndarray]]:
        """The micro-batches of optimizer step `step` (1-based): a pure function of the step."""
        from control.data import iterate_batches

        out = []
        for j in range(self.micro_batches):
            epoch, pos = divmod((step - 1) * self.micro_batches + j, self.per_epoch)
            _, b = next(iterate_batches(self.train_enc, self.train_y, self.batch, self.seed,
                                        epoch, pos))
            out.append(b.as_dict())
        return out


def prepare(run: Run) -> Job:
    from control.job import load_model, rotten_tomatoes_batches
    from control.local import OptimConfig
    from control.partition import bert_costs

    cfg = run.config
    model = load_model(cfg.model or None, num_labels=2, head_seed=cfg.seed)
    enc, y, test = rotten_tomatoes_batches(model.path / "tokenizer.json", cfg.seq, cfg.batch,
                                           cfg.eval_examples, cfg.seed)
    opt = OptimConfig(lr=cfg.lr, warmup_steps=cfg.warmup_steps, total_steps=cfg.steps)
    return Job(model, enc, np.asarray(y), test, opt, bert_costs(model.dims, cfg.batch, cfg.seq),
               cfg.batch, cfg.micro_batches, cfg.seed)


def train(run: Run) -> None:
    """Run to `config.steps` (or until stopped), recovering from lost boards by itself."""
    from control.cluster import LocalCluster
    from control.run import threads_per_board
    from control.run_report import write_report

    cfg = run.config
    run._set_state("starting")
    cluster = None
    try:
        job = run._job = prepare(run)
        c = run.latest_checkpoint()
        if c is not None:
            run.alert("info", f"continuing from checkpoint step {c.step} ({c.path})")
        if cfg.registry:          # running daemons (control/remote.py)
            from control.remote import AttachedCluster, read_registry

            names = list(read_registry(cfg.registry, [n for n in cfg.board_names.split(",")
                                                      if n] or None))
            if len(names) < cfg.boards:
                raise ConfigError(f"run config: boards = {cfg.boards}, but {cfg.registry} "
                                  f"gives {names}")
            cluster = run.cluster = AttachedCluster(
                cfg.registry, names[:cfg.boards], run_seed=cfg.seed, timeout=cfg.timeout_s,
                workdir=run.dir / "boards")
        else:
            cluster = run.cluster = LocalCluster(
                cfg.boards, budget_mib=cfg.budget_mib or None, threads=threads_per_board(cfg),
                run_seed=cfg.seed, timeout=cfg.timeout_s, workdir=run.dir / "boards")
        deploy(run, job, initial_ranges(run, job), "resume" if c else "start", c)
        if c is None:     # no checkpoint 0: a failure before the first one restarts from step 0
            evaluate(run, job, None)
        run._set_state("running")
        _loop(run, job)
        if run.step < cfg.steps:          # stopped: make sure the stop point is on disk
            if run.state != "stopping":
                run._set_state("stopping")
            last = ckpt.list_steps(run.checkpoint_dir)
            if not last or last[-1] != run.step:
                checkpoint(run, *gather(run, True))
            run._set_state("stopped", note=f"resume with: edgert resume {run.dir}")
        else:
            run._set_state("finished")
    except BaseException as e:
        run._set_state("failed", note=f"{type(e).__name__}: {e}")
        raise
    finally:
        run.cluster = None
        if cluster is not None:
            cluster.close()
            for d in (run.dir / "boards").glob("board*"):   # uploaded copies; keep the logs
                if d.is_dir():
                    shutil.rmtree(d, ignore_errors=True)
        try:
            write_report(run)
        except Exception as e:  # noqa: BLE001 - a report must not hide the run's own error
            log.warning("could not write the report of %s: %s", run.dir, e)


def _loop(run: Run, job: Job) -> None:
    cfg = run.config
    high = run.step               # the furthest step reached (steps past a checkpoint are redone)
    while run.step < cfg.steps and not run._stop.is_set():
        if not run._unpaused.is_set():
            run._set_state("paused")
            run._unpaused.wait()
            run._set_state("stopping" if run._stop.is_set() else "running")
            continue
        try:
            if far_run.maybe_switch(run, job):      # FAR after priming ([Note: FAR in runs])
                continue
            one_step(run, job)
            high = max(high, run.step)
            after_step(run, job)
            if run.step < cfg.steps:
                maybe_replan(run, job)
        except (BoardError, TransportError) as e:
            recover_until_done(run, job, e, high)


class RunAborted(BoardError):
    """Recovery is impossible or has been tried `max_recoveries` times."""


def recover_until_done(run: Run, job: Job, error: BaseException, high: int) -> None:
    """`recover`; a board lost during the recovery itself starts another one."""
    while True:
        try:
            recover(run, job, error, high)
            return
        except RunAborted:
            raise
        except (BoardError, TransportError) as e:
            error = e


def one_step(run: Run, job: Job) -> None:
    s = run.step + 1
    micro = job.micro(s)
    t0 = time.perf_counter()
    loss = run.cluster.train_step(micro, job.opt)
    dt = time.perf_counter() - t0
    run.step = s
    run.events.emit("step", step=s, loss=loss, step_s=dt, lr=job.opt.lr_at(s),
                    seq_per_s=job.batch * job.micro_batches / dt)


def after_step(run: Run, job: Job) -> None:
    cfg, s = run.config, run.step
    if s % cfg.board_every == 0 or s == cfg.steps:
        board_events(run)
    want_ckpt = s % cfg.checkpoint_every == 0 or s == cfg.steps
    want_eval = (cfg.eval_every and s % cfg.eval_every == 0) or s == cfg.steps
    if want_ckpt or want_eval:
        params, opt = gather(run, want_ckpt)
        if want_ckpt:
            checkpoint(run, params, opt)
        if want_eval:
            evaluate(run, job, params)


# ---- plans and deployment ---------------------------------------------------------------------

def initial_ranges(run: Run, job: Job) -> list[tuple[int, int]]:
    from compiler.model_spec import parse_split

    cfg, layers = run.config, job.model.dims.layers
    if cfg.split or cfg.stages:
        return parse_split(cfg.split or None, cfg.stages or None, layers)
    return plan_over(run, job, [b.name for b in run.cluster.boards])


def plan_over(run: Run, job: Job, names: list[str]) -> list[tuple[int, int]]:
    """The memory-aware planner's split over these boards (one stage each)."""
    from control.partition import plan

    boards = stage_boards(run, names)
    p = plan(job.costs, boards, job.micro_batches)
    log.info("plan over %s:\n%s", names, p.explain())
    return p.ranges


def deploy(run: Run, job: Job, ranges: list[tuple[int, int]], reason: str,
           c: ckpt.Checkpoint | None, state: tuple[dict, dict, int] | None = None
           ) -> dict[str, float]:
    """Compile (from the cache when possible) and load `ranges` on the first boards; then load
    checkpoint `c`, or the live `state` (params, AdamW moments, step) of a migration, or start
    from the bundles' initial weights at step 0. Returns the seconds each part took."""
    from control.far_run import stage_bundles, to_far_layout

    t0 = time.perf_counter()
    split = ",".join(f"{a}:{b}" for a, b in ranges)
    bundles = stage_bundles(run, job, split, c, state is None)   # dense or FAR (docs/far.md)
    t1 = time.perf_counter()
    run.cluster.deploy(bundles, micro_batches=job.micro_batches)
    t2 = time.perf_counter()
    if c is not None:
        params, opt = c.load()
        state = (to_far_layout(run, params), opt, c.step)
    if state is not None:
        run.cluster.load_state(*state)
    t3 = time.perf_counter()
    run.step = state[2] if state is not None else 0
    drift_watch(run).reset(deployed=True, decided=reason == "re-plan")
    run.ranges, run._bundles, run._pipe = list(ranges), list(bundles), None
    run.events.emit("plan", ranges=[list(r) for r in ranges], mode="sync", reason=reason,
                    boards=[b.name for b in run.cluster.stages], micro_batches=job.micro_batches,
                    **({"speeds": dict(run._speeds)} if getattr(run, "_speeds", None) else {}))
    return {"compile_s": t1 - t0, "deploy_s": t2 - t1, "load_checkpoint_s": t3 - t2}


# ---- state ------------------------------------------------------------------------------------

def gather(run: Run, with_opt: bool) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    params = run.cluster.params()
    return params, (run.cluster.optimizer_state() if with_opt else {})


def checkpoint(run: Run, params: dict[str, np.ndarray], opt: dict[str, np.ndarray]) -> None:
    """A consistent checkpoint at this step boundary (see control/checkpoint.py)."""
    cfg = run.config
    t0 = time.perf_counter()
    names = [[t.name for t in b.manifest.params] for b in run.cluster.stages]
    meta = {"run_seed": cfg.seed, "data": run._job.position(run.step),
            "rng": {"dropout": "control.local.step_seed(run_seed, step, micro_batch)",
                    "data_order": "numpy default_rng([seed, epoch]).permutation",
                    "next_step": run.step + 1},
            "plan": {"ranges": [list(r) for r in run.ranges],
                     "boards": [b.name for b in run.cluster.stages]},
            "config": cfg.to_dict(), **far_run.checkpoint_meta(run)}
    c = ckpt.write(run.checkpoint_dir, run.step, names, params, opt, meta,
                   keep=cfg.keep_checkpoints)
    run.events.emit("checkpoint", step=run.step, path=str(c.path),
                    seconds=time.perf_counter() - t0)


def evaluate(run: Run, job: Job, params: dict[str, np.ndarray] | None) -> None:
    """Held-out loss and accuracy in this process (dropout off) on the given weights."""
    from control.local import LocalPipeline

    if run._pipe is None:
        run._pipe = LocalPipeline(run._bundles, run_seed=run.config.seed)
    if params is not None:
        run._pipe.load_state(params, None, run.step)
    loss, acc = run._pipe.evaluate(job.test_batches)
    run.events.emit("eval", step=run.step, loss=loss, accuracy=acc,
                    examples=len(job.test_batches) * job.batch)


def board_events(run: Run) -> None:
    from edgert.head_split.executor import second_backend_heads

    c, budget = run.cluster, run.config.budget_mib or None
    for i, b in enumerate(c.boards):
        st = c.stats(i)
        comp = st.get("compute_s") or [None]
        run.events.emit("board", name=b.name, stage=i if i < len(c.stages) else None,
                        rss_mib=st["rss"] / 2**20, peak_rss_mib=st["peak_rss"] / 2**20,
                        budget_mib=budget, compute_s=comp[-1], queue=st.get("queue_depth"),
                        errors=st.get("errors"), alive=True, pid=b.proc.pid,
                        head_split=second_backend_heads(st.get("head_split")))


# ---- recovery ---------------------------------------------------------------------------------

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


def recover(run: Run, job: Job, error: BaseException, high: int) -> None:
    """Re-plan over the surviving boards and continue from the last checkpoint (by itself)."""
    cfg = run.config
    t0 = time.perf_counter()
    first = str(error).splitlines()[0]
    run.alert("error", f"step {run.step + 1} failed: {first}")
    run._attempts += 1
    if run._attempts > cfg.max_recoveries:
        raise RunAborted(f"giving up after {run._attempts - 1} recovery attempts (max_recoveries "
                         f"= {cfg.max_recoveries}); last failure: {first}. Check the boards' logs "
                         f"in {run.dir / 'boards'}, then `edgert resume {run.dir}`") from error
    lost = find_lost(run.cluster)
    for name in lost:
        run.events.emit("board", name=name, alive=False, stage=None)
    survivors = [b.name for b in run.cluster.boards]
    if not survivors:
        raise RunAborted(f"every board is lost ({lost}); restart the boards and continue with "
                         f"`edgert resume {run.dir}`") from error
    k = min(len(run.ranges), len(survivors))
    ranges = run.ranges if k == len(run.ranges) else plan_over(run, job, survivors[:k])
    t_plan = time.perf_counter()
    c = run.latest_checkpoint()
    t_verify = time.perf_counter()
    parts = deploy(run, job, ranges, "board lost" if lost else "re-plan", c)
    start = c.step if c is not None else 0
    rec = {"failed_step": high + 1, "lost": lost, "from_checkpoint": start,
           "steps_redone": high - start, "ranges": [list(r) for r in ranges],
           "boards": survivors[:k], "seconds": time.perf_counter() - t0,
           "probe_plan_s": t_plan - t0, "verify_checkpoint_s": t_verify - t_plan, **parts}
    run.recoveries.append(rec)
    run.alert("warning" if lost else "info",
              f"recovered in {rec['seconds']:.1f} s: lost {lost or 'no board'}; now {k} stage(s) "
              f"{ranges} on {survivors[:k]}; from checkpoint step {start}, redoing "
              f"{high - start} step(s)")


# ---- re-partitioning on speed drift (see [Note: speed drift] in control/replan.py) -------------

def drift_watch(run: Run) -> Any:
    """The run's drift detector (created on first use; `deploy` resets it)."""
    from control.replan import Drift, Watch

    w = getattr(run, "_watch", None)
    if w is None:
        cfg = run.config
        w = run._watch = Watch(Drift(cfg.replan_drift, cfg.replan_patience))
    return w


def stage_boards(run: Run, names: list[str]) -> list[Any]:
    """Planner boards for `names` with the run's memory budget and measured speed estimates."""
    from control.partition import Board
    from control.replan import with_speed

    speeds = getattr(run, "_speeds", None) or {}
    return [with_speed(Board(n, run.config.budget_bytes), speeds.get(n, 1.0)) for n in names]


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


def maybe_replan(run: Run, job: Job) -> bool:
    """Measure drift after this step; re-plan and migrate live when it persists (True if moved)."""
    from control.partition import evaluate as evaluate_plan
    from control.replan import decide, predicted_step_s

    watch = drift_watch(run)
    if not watch.cfg.on or len(run.ranges) < 2:
        return False
    names = [b.name for b in run.cluster.stages]
    boards = stage_boards(run, names)
    current = evaluate_plan(job.costs, boards, run.ranges, job.micro_batches)
    measured = stage_compute_s(run.cluster)
    r = watch.observe(measured, predicted_step_s(current))
    if r is None:
        return False
    run._speeds = dict(getattr(run, "_speeds", None) or {})
    d = decide(job.costs, boards, run._speeds, run.ranges, r, job.micro_batches,
               watch.cfg.margin)
    run._speeds.update(d.speeds)
    if not d.move:
        run.alert("info", f"step {run.step}: speed drift, no better split: {d.why}")
        watch.reset(deployed=False, decided=True)
        return False
    run.alert("warning", f"step {run.step}: speed drift, re-planning live: {d.why}")
    migrate(run, job, d.proposed.ranges, d.why)
    return True


def migrate(run: Run, job: Job, ranges: list[tuple[int, int]], why: str) -> None:
    """Move to `ranges` without restarting: weights and AdamW moments from the boards at this step
    boundary, compile (cached), LOAD in place, set the state, continue at the same step."""
    t0 = time.perf_counter()
    step, old = run.step, list(run.ranges)
    params, opt = gather(run, True)
    t1 = time.perf_counter()
    parts = deploy(run, job, ranges, "re-plan", None, (params, opt, step))
    rec = {"step": step, "from": [list(x) for x in old], "to": [list(x) for x in ranges],
           "why": why, "speeds": dict(run._speeds), "seconds": time.perf_counter() - t0,
           "gather_s": t1 - t0, **parts}
    run.replans = [*getattr(run, "replans", []), rec]
    log.info("re-planned at step %d: %s -> %s in %.1f s", step, old, ranges, rec["seconds"])
