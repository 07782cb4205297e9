"""The executor interprets schedules: K fake stages over the in-process transport, one thread.

A fake stage is a tanh layer in float64 numpy with a seed-dependent "dropout" factor, so wrong
seeds, a wrong loss scale or a wrong accumulation order all change the numbers. The pipelined run
must equal the sequential reference (LocalPipeline's algorithm) exactly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pytest

from edgert.errors import ScheduleError, TransportError
from edgert.executor import Inbox, OptimizerState, StepContext, StepPlan, StepRun
from edgert.protocol import Kind, Message
from edgert.schedule import add_comms, add_step, async_1f1b, gpipe, live_versions, one_f_one_b
from edgert.transport import InprocHub

B, D = 3, 4


@dataclass(frozen=True)
class _Meta:
    name: str


@dataclass(frozen=True)
class FakeManifest:
    data_inputs: tuple[_Meta, ...]
    is_first: bool
    is_last: bool
    dtype: str = "float64"


class FakeStage:
    """y = tanh(x @ W) * drop(seed); the last stage adds loss = sum((y - labels)^2) / B."""

    def __init__(self, index: int, n_stages: int, seed: int = 0) -> None:
        first, last = index == 0, index == n_stages - 1
        names = ["input_ids"] if first else ["hidden", "attention_mask"]
        if last:
            names.append("labels")
        self.manifest = FakeManifest(tuple(_Meta(n) for n in names), first, last)
        self.params = [np.random.default_rng([seed, index]).normal(0, 0.5, (D, D))]
        self.calls: list[str] = []

    @staticmethod
    def _drop(seed: np.ndarray) -> float:
        return 1.0 + 0.01 * float(seed[0] % 7) * float(seed[1])

    def forward(self, data, seed):
        self.calls.append("F")
        x = np.asarray(data[0], np.float64)
        y = np.tanh(x @ self.params[0]) * self._drop(seed)
        if self.manifest.is_last:
            loss = np.array([((y - data[-1]) ** 2).sum() / B])
            return [loss, y], [x, y, data[-1]]
        return [y], [x, y]

    def backward(self, saved, dout, seed):
        self.calls.append("B")
        x, y = saved[0], saved[1]
        d = self._drop(seed)
        if self.manifest.is_last:
            dy = 2 * (y - saved[2]) / B * float(np.asarray(dout)[0])
        else:
            dy = np.asarray(dout)
        dz = dy * d * (1 - (y / d) ** 2)
        grad = x.T @ dz
        dx = None if self.manifest.is_first else dz @ self.params[0].T
        return dx, [grad]

    def accumulate(self, acc, grads):
        return [a + g for a, g in zip(acc, grads, strict=True)]

    def zeros_like_params(self):
        return [np.zeros_like(p) for p in self.params]

    def optimizer_step(self, grads, m, v, hyper):
        m[0] += grads[0]                         # in place, like the compiled AdamW
        self.params[0] -= hyper[0] * grads[0]


def _batches(step: int, n_mb: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng([step, 99])
    return [{"input_ids": rng.normal(size=(B, D)), "attention_mask": np.ones((B, D)),
             "labels": rng.normal(size=(B, D)) * 0.5} for _ in range(n_mb)]


def _seed(step: int, mb: int) -> list[int]:
    return [step * 31 + mb * 3 + 1, 1]   # distinct dropout factors per mb


def reference(n_stages: int, steps: int, n_mb: int, lr: float = 0.1):
    """LocalPipeline.train_step's algorithm over the fake stages."""
    stages = [FakeStage(i, n_stages) for i in range(n_stages)]
    losses = []
    for step in range(1, steps + 1):
        acc, ls = None, []
        for j, b in enumerate(_batches(step, n_mb)):
            seed = np.array(_seed(step, j), np.int64)
            h, saved = None, []
            for st in stages:
                data = [h if m.name == "hidden" else b[m.name] for m in st.manifest.data_inputs]
                outs, sv = st.forward(data, seed)
                saved.append(sv)
                h = outs[0]
            ls.append(float(outs[0][0]))
            dout, grads = np.array([1.0 / n_mb]), [None] * n_stages
            for i in reversed(range(n_stages)):
                dout, grads[i] = stages[i].backward(saved[i], dout, seed)
            acc = grads if acc is None else [s.accumulate(a, g)
                                             for s, a, g in zip(stages, acc, grads, strict=True)]
        for st, g in zip(stages, acc, strict=True):
            st.optimizer_step(g, st.zeros_like_params(), None, np.array([lr]))
        losses.append(float(np.mean(ls)))
    return losses, [st.params[0] for st in stages]


class Cluster:
    """K boards' executors over one InprocHub, driven round-robin in this thread."""

    def __init__(self, schedule, n_stages: int, n_mb: int, group: int = 0) -> None:
        self.hub = InprocHub()
        self.ctl = self.hub.endpoint("ctl")
        self.stages = [FakeStage(i, n_stages) for i in range(n_stages)]
        self.opts = [OptimizerState(s) for s in self.stages]
        self.links = [self.hub.endpoint(f"b{i}") for i in range(n_stages)]
        self.inboxes = [Inbox() for _ in range(n_stages)]
        self.ctxs = [StepContext(i, n_stages, n_mb, "r", f"b{i - 1}" if i else None,
                                 f"b{i + 1}" if i < n_stages - 1 else None, group)
                     for i in range(n_stages)]
        self.schedule, self.n_mb = schedule, n_mb

    def step(self, step: int, batches, hyper) -> list[StepRun]:
        for i, st in enumerate(self.stages):
            names = [m.name for m in st.manifest.data_inputs if m.name != "hidden"]
            for j, b in enumerate(batches):
                self.ctl.send(f"b{i}", Message.make(Kind.BATCH, "r", 0, step=step, stage=i, mb=j,
                                                    arrays={n: b[n] for n in names}))
        plan = StepPlan.from_body(step, {"seeds": [_seed(step, j) for j in range(len(batches))],
                                         "hyper": hyper}, len(batches))
        runs = [StepRun(self.schedule[i], st, self.opts[i], self.ctxs[i], plan, self.links[i].send)
                for i, st in enumerate(self.stages)]
        for _ in range(10_000):
            for i, run in enumerate(runs):
                while (got := self.links[i].recv(0)) is not None:
                    self.inboxes[i].put(got[1])
                run.advance(self.inboxes[i])
            if all(r.done for r in runs):
                return runs
        raise AssertionError("pipeline deadlocked:\n" + "\n".join(r.grid() for r in runs))


@pytest.mark.parametrize("n_stages,n_mb", [(1, 1), (1, 3), (2, 2), (3, 2), (3, 4), (4, 3)])
@pytest.mark.parametrize("gen", [one_f_one_b, gpipe])
def test_sync_pipeline_equals_sequential_reference(n_stages, n_mb, gen):
    steps = 3
    ref_losses, ref_w = reference(n_stages, steps, n_mb)
    c = Cluster(add_comms(add_step(gen(n_stages, n_mb))), n_stages, n_mb)
    losses = []
    for step in range(1, steps + 1):
        runs = c.step(step, _batches(step, n_mb), [[0.1]])
        last = runs[-1].result.losses
        assert sorted(last) == list(range(n_mb))
        losses.append(float(np.mean([last[j] for j in range(n_mb)])))
        assert all(len(ib) == 0 for ib in c.inboxes)   # every message consumed
    assert losses == ref_losses                          # exact: same ops in the same order
    for st, w in zip(c.stages, ref_w, strict=True):
        np.testing.assert_array_equal(st.params[0], w)
    assert all(o.steps == steps for o in c.opts)


def test_wrong_seed_changes_numbers():
    """The check above would notice seeds applied to the wrong micro-batch."""
    ref_losses, _ = reference(2, 1, 2)
    c = Cluster(add_comms(add_step(one_f_one_b(2, 2))), 2, 2)
    plan_seeds = [_seed(1, 1), _seed(1, 0)]      # swapped
    for i, st in enumerate(c.stages):
        names = [m.name for m in st.manifest.data_inputs if m.name != "hidden"]
        for j, b in enumerate(_batches(1, 2)):
            c.inboxes[i].put(Message.make(Kind.BATCH, "r", 0, step=1, stage=i, mb=j,
                                          arrays={n: b[n] for n in names}))
    plan = StepPlan.from_body(1, {"seeds": plan_seeds, "hyper": [[0.1]]}, 2)
    runs = [StepRun(c.schedule[i], st, c.opts[i], c.ctxs[i], plan, c.links[i].send)
            for i, st in enumerate(c.stages)]
    for _ in range(50):
        for i, r in enumerate(runs):
            while (got := c.links[i].recv(0)) is not None:
                c.inboxes[i].put(got[1])
            r.advance(c.inboxes[i])
    assert runs[-1].done
    assert float(np.mean(list(runs[-1].result.losses.values()))) != ref_losses[0]


def test_blocks_until_message_then_resumes():
    c = Cluster(add_comms(add_step(one_f_one_b(2, 1))), 2, 1)
    plan = StepPlan.from_body(1, {"seeds": [_seed(1, 0)], "hyper": [[0.1]]}, 1)
    run = StepRun(c.schedule[1], c.stages[1], c.opts[1], c.ctxs[1], plan, c.links[1].send)
    assert run.advance(c.inboxes[1]) is False          # RECV_F0: nothing yet
    assert run.blocked_on == "1RECV_F0"
    assert c.stages[1].calls == []
    with pytest.raises(TransportError, match="waited 5 s .*1RECV_F0"):
        run.fail_if_stuck(5.0, run.blocked_since + 6.0)


def test_failure_logs_the_timeline_with_the_failing_slot(caplog):
    c = Cluster(add_comms(add_step(one_f_one_b(1, 2))), 1, 2)
    plan = StepPlan.from_body(1, {"seeds": [_seed(1, 0), _seed(1, 1)], "hyper": [[0.1]]}, 2)
    c.inboxes[0].put(Message.make(Kind.BATCH, "r", 0, step=1, stage=0, mb=0,
                                  arrays={"attention_mask": np.ones((B, D))}))   # no input_ids
    run = StepRun(c.schedule[0], c.stages[0], c.opts[0], c.ctxs[0], plan, c.links[0].send)
    with caplog.at_level(logging.ERROR), pytest.raises(ScheduleError, match="lacks 'input_ids'"):
        run.advance(c.inboxes[0])
    assert "0F0 failed at slot 0" in caplog.text
    assert "^^^ error at slot 0" in caplog.text


def test_step_without_hyper_is_an_error():
    c = Cluster(add_comms(add_step(one_f_one_b(1, 1))), 1, 1)
    c.inboxes[0].put(Message.make(Kind.BATCH, "r", 0, step=1, stage=0, mb=0,
                                  arrays={"input_ids": np.ones((B, D)),
                                          "labels": np.ones((B, D))}))
    plan = StepPlan.from_body(1, {"seeds": [_seed(1, 0)]}, 1)
    run = StepRun(c.schedule[0], c.stages[0], c.opts[0], c.ctxs[0], plan, c.links[0].send)
    with pytest.raises(ScheduleError, match="0 hyper vector"):
        run.advance(c.inboxes[0])


def test_bad_seed_list_is_rejected():
    with pytest.raises(ScheduleError, match="must list 2 seed vectors"):
        StepPlan.from_body(1, {"seeds": [[1, 1]], "hyper": []}, 2)


@pytest.mark.parametrize("n_stages,group", [(2, 2), (3, 3), (2, 4)])
def test_async_2bw_trains_with_at_most_two_versions(n_stages, group):
    n_total = 8 * group
    sched = add_comms(async_1f1b(n_stages, n_total, group))
    assert all(live_versions(sched, s) <= 2 for s in range(n_stages))
    c = Cluster(sched, n_stages, n_total, group)
    fixed = _batches(0, 1)[0]          # one batch over and over: the loss must fall
    n_updates = -(-n_total // group)
    runs = c.step(1, [fixed] * n_total, [[0.05]] * n_updates)
    losses = [runs[-1].result.losses[j] for j in range(n_total)]
    assert np.mean(losses[-group:]) < 0.8 * np.mean(losses[:group])
    assert all(r.result.max_versions <= 2 for r in runs)
    assert max(r.result.max_versions for r in runs) == 2        # stashing did happen
    assert all(len(o.stash) == 0 for o in c.opts)             # every stash released
    assert all(o.version == n_updates for o in c.opts)
