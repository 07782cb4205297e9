"""Federated forward-gradient fine-tuning: client shards, clients (in-process or boards), the job.

Each client holds its own shard of the training data (IID or non-IID by label, seeded) and one
whole-model bundle; per round the server (control/fwdgrad_run.py `FwdGradRun`, on the controller)
sends it the trainable values and perturbation seeds, gets back one directional derivative per
seed, aggregates the clients' estimates weighted by their shard sizes (control/fwdgrad.gather)
and takes an SGD step. Only the trainable (PEFT) tensors change; everything else stays as
deployed. `fwdgrad_finetune` is the BERT job (`edgert fwdgrad`); its rounds run in
control/fwdgrad_run.py's `drive`.

Examples
--------
>>> run = FwdGradRun(BoardClients(cluster, bundle), names, values, cfg)   # doctest: +SKIP
>>> drive(run, rounds=20, events=EventLog(), evaluate=ev, ckpt_root=None)  # doctest: +SKIP
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from control.fwdgrad import FwdGradConfig
from control.fwdgrad_run import FwdGradRun, drive
from edgert.errors import ConfigError
from edgert.fwdgrad import ForwardClient
from edgert.protocol import Kind, Message, encode


def split_clients(labels: np.ndarray, n_clients: int, *, alpha: float | None = None,
                  seed: int = 0) -> list[np.ndarray]:
    """Row indices of each client's shard.

    alpha None: IID (a seeded permutation cut into equal parts). alpha > 0: non-IID by label, each
    label's rows divided among clients in Dirichlet(alpha) proportions (small alpha = skewed).

    >>> [len(s) for s in split_clients(np.array([0, 1] * 10), 3)]
    [7, 7, 6]
    """
    if n_clients < 1:
        raise ConfigError(f"need at least one client, got {n_clients}")
    rng = np.random.default_rng([seed, 0xFED])
    if alpha is None:
        return [np.sort(p) for p in np.array_split(rng.permutation(len(labels)), n_clients)]
    if not alpha > 0:
        raise ConfigError(f"the Dirichlet alpha must be > 0 (small = skewed), got {alpha}")
    parts: list[list[np.ndarray]] = [[] for _ in range(n_clients)]
    for lab in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == lab))
        cuts = (np.cumsum(rng.dirichlet([alpha] * n_clients))[:-1] * len(rows)).astype(int)
        for c, chunk in enumerate(np.split(rows, cuts)):
            parts[c].append(chunk)
    return [np.sort(np.concatenate(p)) for p in parts]


class InProcessClients:
    """Clients as ForwardClients in this process (one shared stage): for tests and baselines."""

    def __init__(self, stage: Any, shards: Sequence[dict[str, np.ndarray]]) -> None:
        self.client = ForwardClient(stage)
        self.shards = list(shards)
        self.bytes_down = self.bytes_up = 0

    @property
    def sizes(self) -> list[int]:
        return [len(s["labels"]) for s in self.shards]

    def evaluate(self, values, names, seeds, eps, rows) -> list[dict[str, Any]]:
        out = []
        for c, shard in enumerate(self.shards):
            self.client.set_shard(shard)
            self.client.set_values(values)
            out.append(self.client.round(names, seeds[c], eps, rows[c]) if seeds[c]
                       else {"derivs": [], "loss": float("nan")})
        return out


class BoardClients:
    """Each board of a LocalCluster is one client: FWDGRAD load, shard, round requests."""

    def __init__(self, cluster: Any, bundle: Path | str,
                 shards: Sequence[dict[str, np.ndarray]]) -> None:
        if len(shards) > len(cluster.boards):
            raise ConfigError(f"{len(shards)} client shards need as many boards, the cluster has "
                              f"{len(cluster.boards)}")
        self.c = cluster
        self.boards = cluster.boards[:len(shards)]
        self.shards = list(shards)
        self.bytes_down = self.bytes_up = 0
        self.memory: dict[str, list[dict[str, float]]] = {}   # phase -> per board RSS, MiB
        self._memory("idle")
        for b in self.boards:
            cluster.upload(b, Path(bundle), "fwd")
        self._memory("uploaded")
        self._all(Kind.FWDGRAD, [{"body": {"op": "load", "bundle": "fwd"}}] * len(self.boards))
        self._memory("loaded")
        self._all(Kind.FWDGRAD, [{"body": {"op": "shard"}, "arrays": s} for s in shards])
        self._memory("shard")
        self.bytes_down = self.bytes_up = 0   # count rounds only

    def _memory(self, phase: str) -> None:
        """Record each board's current and peak RSS (VmHWM: the peak since the board started)."""
        stats = [self.c.stats(i) for i in range(len(self.boards))]
        self.memory[phase] = [{"rss_mib": s["rss"] / 2 ** 20,
                               "peak_rss_mib": s["peak_rss"] / 2 ** 20} for s in stats]

    @property
    def sizes(self) -> list[int]:
        return [len(s["labels"]) for s in self.shards]

    def _all(self, kind: Kind, kws: list[dict[str, Any]]) -> list[Message]:
        wanted = []
        for b, kw in zip(self.boards, kws, strict=True):
            self.bytes_down += _wire_bytes(Message.make(kind, "", 0, **kw))
            wanted.append((b.name, self.c.send(b, kind, **kw)))
        got = self.c.collect(set(wanted))
        replies = [got[k] for k in wanted]
        self.bytes_up += sum(_wire_bytes(m) for m in replies)
        return replies

    def evaluate(self, values, names, seeds, eps, rows) -> list[dict[str, Any]]:
        arrays = {n: np.ascontiguousarray(values[n], np.float32) for n in names}
        kws = [{"body": {"op": "round", "names": list(names), "seeds": s, "eps": eps, "rows": r},
                "arrays": arrays} for s, r in zip(seeds, rows, strict=True)]
        return [dict(m.header.body) for m in self._all(Kind.FWDGRAD, kws)]

    def board_stats(self) -> list[dict[str, Any]]:
        """{name, rss_mib, peak_rss_mib} of every client board, now."""
        out = []
        for i, b in enumerate(self.boards):
            st = self.c.stats(i)
            out.append({"name": b.name, "rss_mib": st["rss"] / 2 ** 20,
                        "peak_rss_mib": st["peak_rss"] / 2 ** 20})
        return out

    def peak_rss(self) -> list[int]:
        self._memory("end")
        return [int(self.c.stats(i)["peak_rss"]) for i in range(len(self.boards))]


def _wire_bytes(msg: Message) -> int:
    return sum(len(f) for f in encode(msg))   # bytes


def run_clients(train: Any, bundle: Path | str, stage: Any, shards: Sequence[dict[str, np.ndarray]],
                *, boards: bool, threads: int | None = 1, seed: int = 0
                ) -> tuple[FwdGradRun, dict[str, Any]]:
    """`train(clients) -> FwdGradRun` with one client per shard: local board processes
    (`boards`; then also each board's peak RSS, memory by phase and uplink bytes) or
    ForwardClients on `stage` in this process."""
    if not boards:
        return train(InProcessClients(stage, shards)), {}
    from control.connect import ClusterConfig, open_cluster

    where = ClusterConfig(boards=len(shards), threads=threads or 0)
    with open_cluster(where, run_seed=seed) as cluster:
        cl = BoardClients(cluster, bundle, shards)
        srv = train(cl)
        return srv, {"peak_rss_mib": [v / 2 ** 20 for v in cl.peak_rss()],
                     "memory_phases": cl.memory, "bytes_up": cl.bytes_up}


# ---- the job -------------------------------------------------------------------------------------
def compile_lora_bundle(model: Any, out_dir: str | Path, *, batch: int, seq: int, rank: int = 8,
                        alpha: float = 16.0, seed: int = 0) -> Path:
    """A whole-model bundle with LoRA factors on every layer's QKV (A seeded random, B = 0) and
    every base weight frozen: backprop LoRA trains it as is; forward-gradient clients perturb its
    factors by name (method "lora")."""
    from compiler.arch import get_arch
    from compiler.build import build_bundle
    from compiler.kernel_tuning import board_configs
    from compiler.model_spec import stage_specs
    from compiler.peft import lora_init, peft_spec

    arch = get_arch("host")
    (spec,) = stage_specs([(0, model.dims.layers)], batch, seq)
    spec = peft_spec(spec, model.dims, "lora", rank=rank, alpha=alpha)
    weights = {**model.weights, **lora_init(model.dims, spec, seed)}
    build_bundle(Path(out_dir), model.dims, spec, arch, weights, model.model_id, model.sha256,
                 configs=board_configs(arch, None))
    return Path(out_dir)


def _eval(stage: Any, base: dict[str, np.ndarray], values: dict[str, np.ndarray],
          batches: list[dict[str, np.ndarray]]) -> dict[str, float]:
    """Held-out loss and accuracy of the model with `values` for the trainable tensors."""
    from control.local import stage_inputs

    stage.set_params({**base, **values})
    losses, correct, n = [], 0, 0
    for b in batches:
        lossv, logits = stage.loss(stage_inputs(stage, b, None))   # dropout off
        losses.append(float(np.from_dlpack(lossv)[0]))
        correct += int((np.from_dlpack(logits).argmax(1) == b["labels"]).sum())
        n += len(b["labels"])
    return {"loss": float(np.mean(losses)), "accuracy": correct / max(1, n), "examples": n}


def fwdgrad_finetune(*, model_dir: str | Path | None = None, out_dir: str | Path = "runs/fwdgrad",
                     clients: int = 3, rounds: int = 20, method: str = "bitfit",
                     alpha: float | None = None, batch: int = 8, seq: int = 32,
                     rows_per_round: int = 8, eval_examples: int = 128, seed: int = 0,
                     cfg: FwdGradConfig | None = None, boards: bool = True, threads: int = 1,
                     bundle: Path | str | None = None, progress: bool = True,
                     eval_every: int = 0, checkpoint_every: int = 5,
                     resume: bool = True) -> dict[str, Any]:
    """Forward-gradient federated fine-tuning of the new head + a PEFT set on Rotten Tomatoes.

    Parameters
    ----------
    clients : number of federated clients (local board processes with `boards`).
    method : trainable set, "bitfit" (biases, LayerNorms, classifier), "head", or "lora" (LoRA B
        factors + classifier of a LoRA bundle, compiled here if `bundle` is None).
    alpha : None = IID shards; > 0 = non-IID by label (Dirichlet alpha).
    cfg : forward-gradient settings (perturbations, variance threshold, sampler, eps, lr).
    bundle : a compiled whole-model bundle to reuse (else one is compiled under out_dir).
    eval_every : > 0 adds held-out loss/accuracy every that many rounds to `curve` (round 0 and
        the last round are always there).
    checkpoint_every : save the server state to out_dir/checkpoints every that many rounds and
        at the end (0 = never); out_dir/events.jsonl gets the run's events (control/fwdgrad_run).
    resume : continue from the newest good checkpoint in out_dir/checkpoints, if there is one
        (same settings required; `rounds` is the total, so rounds=4 after a 2-round run adds 2).
        False deletes out_dir's checkpoints and events.jsonl first.

    Returns
    -------
    dict: before/after held-out loss and accuracy, per-round logs, bytes, peak RSS per board
    (also out_dir/report.json; out_dir/metrics.json and report.html come from events.jsonl).

    Examples
    --------
    >>> rep = fwdgrad_finetune(clients=2, rounds=5, cfg=FwdGradConfig(k_init=8))  # doctest: +SKIP
    >>> rep["after"]["loss"] < rep["before"]["loss"]                              # doctest: +SKIP
    True
    """
    import json
    import shutil
    from dataclasses import asdict

    from control.events import EventLog
    from control.fwdgrad import trainable_names
    from control.job import load_model, rotten_tomatoes_batches
    from control.run_report import metrics, render_html
    from edgert.runtime import TvmStage

    if rounds < 1 or checkpoint_every < 0:
        raise ConfigError(f"need rounds >= 1 and checkpoint_every >= 0 (0 = never), got {rounds} "
                          f"and {checkpoint_every}")
    cfg = cfg or FwdGradConfig(seed=seed)
    out_dir = Path(out_dir)
    model = load_model(model_dir, num_labels=2, head_seed=seed)
    if bundle is None:
        bundle = _client_bundle(model, method, out_dir / "bundles", batch=batch, seq=seq,
                                seed=seed, progress=progress)
    stage = TvmStage.load(bundle)
    base = stage.params_numpy()
    names = trainable_names(list(base), method)
    train_enc, train_y, test = rotten_tomatoes_batches(model.path / "tokenizer.json", seq, batch,
                                                       eval_examples, seed)
    parts = split_clients(np.asarray(train_y), clients, alpha=alpha, seed=seed)
    shards = [{**{k: v[p] for k, v in train_enc.items()}, "labels": np.asarray(train_y)[p]}
              for p in parts]   # each client's rows, as one batch dict
    rep: dict[str, Any] = {"clients": clients, "rounds": rounds, "method": method, "alpha": alpha,
                           "batch": batch, "seq": seq, "rows_per_round": rows_per_round,
                           "trainable": int(sum(base[n].size for n in names)),
                           "shard_sizes": [len(p) for p in parts],
                           "label_share": [float(np.mean(s["labels"])) for s in shards],
                           "cfg": asdict(cfg)}
    settings = {k: rep[k] for k in ("clients", "method", "alpha", "batch", "seq",
                                    "rows_per_round", "shard_sizes", "cfg")} | {"seed": seed}
    out_dir.mkdir(parents=True, exist_ok=True)
    if not resume:                     # afresh: an old run's checkpoints and events would mix in
        shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)
        (out_dir / "events.jsonl").unlink(missing_ok=True)
    events = EventLog(out_dir / "events.jsonl")

    def run(cl: Any) -> FwdGradRun:
        srv = FwdGradRun(cl, names, {n: base[n] for n in names}, cfg, rows_per_round)
        on_boards = isinstance(cl, BoardClients)
        who = [b.name for b in cl.boards] if on_boards else [f"client{c}"
                                                             for c in range(len(shards))]
        rep["curve"] = drive(srv, rounds=rounds, events=events,
                             evaluate=lambda v: _eval(stage, base, v, test),
                             ckpt_root=out_dir / "checkpoints", checkpoint_every=checkpoint_every,
                             resume=resume, eval_every=eval_every, settings=settings,
                             board_stats=cl.board_stats if on_boards else None,
                             progress=progress, client_names=who)
        return srv

    t0 = time.perf_counter()
    srv, mem = run_clients(run, bundle, stage, shards, boards=boards, threads=threads, seed=seed)
    rep.update(mem)
    rep["seconds"] = time.perf_counter() - t0
    curve = rep["curve"]
    rep["before"] = {k: v for k, v in curve[0].items() if k not in ("round", "seconds")}
    rep["after"] = ({k: v for k, v in curve[-1].items() if k not in ("round", "seconds")}
                    if curve[-1]["round"] == rounds else _eval(stage, base, srv.values, test))
    rep["log"] = [asdict(x) for x in srv.log]
    rep["bytes_per_round"] = _bytes_per_round(srv, rep["trainable"], base, clients)
    (out_dir / "report.json").write_text(json.dumps(rep, indent=1))
    m = metrics(EventLog.read(out_dir / "events.jsonl"))        # the pipeline runs' views
    (out_dir / "metrics.json").write_text(json.dumps(m, indent=1))
    (out_dir / "report.html").write_text(render_html(m, title=f"edgert fwdgrad {out_dir.name}"))
    return rep


def _client_bundle(model: Any, method: str, out: Path, *, batch: int, seq: int, seed: int,
                   progress: bool) -> Path:
    """The whole-model bundle every client holds: a LoRA bundle for the LoRA methods."""
    if method.startswith("lora"):
        return compile_lora_bundle(model, out / "lora", batch=batch, seq=seq, seed=seed)
    from control.job import compile_bundles

    return compile_bundles(model, out, stages=1, batch=batch, seq=seq, progress=progress)[0]


def _bytes_per_round(srv: FwdGradRun, trainable: int, base: dict[str, np.ndarray],
                     clients: int) -> dict[str, float]:
    """Wire bytes per round, measured, against sending gradient tensors instead (bytes)."""
    return {"up_mean": float(np.mean([x.bytes_up for x in srv.log])),
            "down_mean": float(np.mean([x.bytes_down for x in srv.log])),
            "up_if_gradient_tensors": 4 * trainable * clients,        # PEFT gradients
            "up_if_full_gradients": 4 * sum(a.size for a in base.values()) * clients}
