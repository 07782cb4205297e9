"""Benchmark: FAR (retention 0.4) vs full fine-tuning vs random selection (MiniLM, Rotten Tomatoes).

    .venv/bin/python bench/bench_far.py                        # ~20-30 min on 2 cores
    .venv/bin/python bench/bench_far.py --steps 40 --eval 512  # quicker
    .venv/bin/python bench/bench_far.py --sweep 2x32,8x64      # other sweep shapes ('' = none)

One process, one stage (every layer), batch 8 x 64 tokens, dropout on. The full run primes for
5% of the steps; FAR (top-L1 learners), FAR with the embeddings frozen too (the paper's operating
point) and the random control then start from that same primed state (weights + AdamW moments)
and all train on the *same* batches, their steps interleaved (the order rotates every step) so
that the machine's load hits them alike. Reported: median step times and their ratios, per-step
paired ratios, a forward / backward / optimizer breakdown, held-out accuracy after equal steps,
and memory: the stage's training-state bytes from the manifests (params, grads, AdamW moments,
saved activations) and the peak RSS of a fresh process per mode.
Then a sweep over shapes (batch x seq; step times only): full vs FAR vs FAR + frozen embeddings,
interleaved from one primed state per shape, with the breakdown, the cost of the embedding
backward kernel alone, the FLOP bound of each ratio (`flop_ceiling`) and the real token lengths of
the dataset; plotted in far_step_ratio.svg.
Results: bench/results/far.json (the top-level keys are the primary setting, batch 8 x 64).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

OUT = ROOT / "bench" / "results" / "far.json"
BUILD = ROOT / "build" / "bench_far"
MIB = 1 << 20


def _train_bytes(pipe) -> dict[str, int]:
    """Bytes a training step holds: all params once, trained ones x3 more (grad, m, v), saved."""
    m = pipe.stages[0].manifest
    params = sum(t.nbytes for t in m.params)
    trained = sum(t.nbytes for t in m.trainable)
    saved = sum(t.nbytes for t in m.saved)
    return {"params": params, "trained_params": trained, "saved_per_micro_batch": saved,
            "total": params + 3 * trained + saved}


def _vm(key: str) -> float:
    """MiB of a /proc/self/status field (VmHWM: peak RSS; getrusage's ru_maxrss is useless in a
    child: it inherits the parent's peak across fork + exec)."""
    with open("/proc/self/status", encoding="utf-8") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith(key + ":")) / 1024


def _rss_child(bundle: str, batch: int, seq: int) -> None:
    """(child process, like a board: no torch) load one stage, train 3 steps, print peak RSS."""
    sys.modules["torch"] = None   # type: ignore[assignment]  # [Note: torch and tvm_ffi]
    from bench.bench_pipeline import dataset
    from control.local import LocalPipeline, OptimConfig

    _, batches = dataset(batch, seq)
    base = _vm("VmRSS")
    pipe = LocalPipeline([bundle])
    for b in batches[:3]:
        pipe.train_step([b], OptimConfig(lr=1e-4))
    print(json.dumps({"peak_rss_mib": _vm("VmHWM"), "stage_mib": _vm("VmHWM") - base}))


def _peak_rss(bundle: Path, batch: int, seq: int) -> dict:
    r = subprocess.run([sys.executable, __file__, "--rss-child", str(bundle), "--batch", str(batch),
                        "--seq", str(seq)], capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def _breakdown(pipes: dict, batch: dict, reps: int) -> dict:
    """Median ms of forward, forward+backward and a whole train step per mode, interleaved."""
    from control.local import OptimConfig, seed_vec

    t: dict = {k: {"forward": [], "forward_backward": [], "step": []} for k in pipes}
    for _ in range(reps):
        for k, p in pipes.items():
            t0 = time.perf_counter()
            p.predict(batch)
            t1 = time.perf_counter()
            p.forward_backward(batch, seed_vec(5, True), 1.0)
            t2 = time.perf_counter()
            p.train_step([batch], OptimConfig(lr=1e-9))
            t3 = time.perf_counter()
            t[k]["forward"].append(t1 - t0)
            t[k]["forward_backward"].append(t2 - t1)
            t[k]["step"].append(t3 - t2)
    return {k: {n: 1000 * statistics.median(v) for n, v in d.items()} for k, d in t.items()}


def _layer_ffn(model, learners: int, batch: int, seq: int, reps: int) -> dict:
    """One encoder layer (a middle stage) dense vs FAR: median forward / backward ms, interleaved."""
    from compiler.arch import get_arch
    from compiler.build import build_bundle
    from compiler.far import far_spec, reconfigure, select
    from compiler.model_spec import StageSpec
    from control.local import seed_vec
    from edgert.runtime import TvmStage

    spec, arch = StageSpec(1, 3, 2, 3, batch, seq), get_arch("host")
    plan = select({2: np.random.default_rng(0).random(model.dims.ffn)}, learners)
    st = {}
    for k, sp, w in (("full", spec, model.weights),
                     ("far", far_spec(spec, plan), reconfigure(model.weights, plan))):
        d = BUILD / f"layer_{k}"
        build_bundle(d, model.dims, sp, arch, w, model.model_id, model.sha256, configs={})
        st[k] = TvmStage.load(d)
    h = model.weights["embeddings.word_embeddings.weight"][
        np.arange(batch * seq) * 37 % model.dims.vocab]          # realistic scale, fixed rows
    mask, seed = np.ones((batch, seq), np.int64), seed_vec(3, True)
    t: dict = {k: {"forward": [], "backward": []} for k in st}
    for _ in range(reps):
        for k, s in st.items():
            t0 = time.perf_counter()
            outs, saved = s.forward([h, mask], seed)
            t1 = time.perf_counter()
            s.backward(saved, outs[0], seed)
            t[k]["forward"].append(t1 - t0)
            t[k]["backward"].append(time.perf_counter() - t1)
    return {k: {n: 1000 * statistics.median(v) for n, v in d.items()} for k, d in t.items()}


def _frozen_share(pipe) -> float:
    m = pipe.stages[0].manifest
    total = sum(t.nbytes for t in m.params)
    return 1 - sum(t.nbytes for t in m.trainable) / total


def _embeddings() -> tuple[str, ...]:
    from compiler.model_spec import EMBED_PARAMS

    return tuple(n for n, _ in EMBED_PARAMS)


def flop_ceiling(dims, batch: int, seq: int, learners: int, emb_frozen: bool) -> dict:
    """FAR's step-time ratio if time were proportional to matmul FLOPs: the share of a step's
    FLOPs FAR removes (the frozen FFN nodes' two weight-gradient GEMMs; with the embeddings
    frozen also layer 0's input-gradient GEMM through the QKV projection, which only the
    embedding backward reads). Memory-bound work (AdamW, the embedding scatter, elementwise ops)
    is not in it: that is where the measured ratio can go below this bound."""
    from bench.torch_baseline import count_flops

    class _C:      # count_flops reads the Hugging Face config names
        hidden_size, intermediate_size, num_hidden_layers = dims.hidden, dims.ffn, dims.layers
    total = count_flops(_C, batch, seq).train_step
    m, d, f = batch * seq, dims.hidden, dims.ffn
    removed = dims.layers * 2 * (2 * m * d * (f - learners))
    if emb_frozen:
        removed += 2 * m * d * 3 * d
    return {"train_step_gflop": total / 1e9, "removed_gflop": removed / 1e9,
            "ratio_bound": (total - removed) / total}


def _token_lengths(model) -> dict:
    """Real token counts of the training sentences (untruncated, at 512): how much padding each
    compiled length carries."""
    from control.data import Tokenizer, load_rotten_tomatoes

    texts, _ = load_rotten_tomatoes()
    n = Tokenizer(model.path / "tokenizer.json").encode(texts, 512)["attention_mask"].sum(1)
    return {"median": float(np.median(n)), "p90": float(np.percentile(n, 90)),
            "max": int(n.max()), **{f"share_truncated_at_{t}": float((n > t).mean())
                                    for t in (32, 64, 128)}}


def _embed_bwd_ms(model, batch: int, seq: int) -> float:
    """ms of the embedding backward kernel alone (the dense [V, D] word-embedding gradient, zeroed
    and scattered, plus the position/type gradients): what a stage with the embeddings frozen
    no longer computes (compiler/stage.py `_embed_bwd`)."""
    from compiler.arch import get_arch
    from compiler.kernels.embed import build_embed_bwd
    from compiler.kernel_tuning import Measurer

    d = model.dims
    meas = Measurer(get_arch("host"), min_runs=5)
    f = build_embed_bwd(batch, seq, d.vocab, d.hidden, d.max_pos, d.type_vocab)
    rng = np.random.default_rng(0)
    ins = [rng.integers(0, d.vocab, (batch, seq)), np.zeros((batch, seq), np.int64),
           rng.standard_normal((batch * seq, d.hidden)).astype(np.float32)]
    return 1000 * meas.time(meas.compile(f), meas.args(f, 3, ins))


def _interleaved(pipes: dict, batches, opt) -> dict[str, list[float]]:
    """Train every pipeline on the same batches, the order rotating each step; seconds per step."""
    names = list(pipes)
    times: dict[str, list[float]] = {k: [] for k in names}
    for s, b in enumerate(batches):
        r = s % len(names)
        for k in names[r:] + names[:r]:
            t0 = time.perf_counter()
            pipes[k].train_step([b], opt)
            times[k].append(time.perf_counter() - t0)
    return times


def _sweep(model, plan, a: argparse.Namespace) -> dict:
    """Per shape (batch x seq): full vs FAR vs FAR + frozen embeddings, step times interleaved
    (each from one primed full state), the breakdown, the embedding backward's cost and the FLOP
    bound of each ratio."""
    from control.data import iterate_batches
    from control.far import switch_to_far
    from control.job import compile_bundles, rotten_tomatoes_batches
    from control.local import LocalPipeline, OptimConfig

    out = {}
    for batch, seq in a.sweep:
        ck = {"stages": 1, "batch": batch, "seq": seq, "configs": {}}
        where = BUILD / f"sweep{batch}x{seq}"
        full = LocalPipeline(compile_bundles(model, where / "full", progress=False, **ck))
        enc, y, _ = rotten_tomatoes_batches(model.path / "tokenizer.json", seq, batch, batch, 0)
        it = iterate_batches(enc, y, batch, 0, 0)
        batches = [next(it)[1].as_dict() for _ in range(a.sweep_steps + 1)]
        opt = OptimConfig(lr=a.lr)
        full.train_step([batches[0]], opt)             # primed: every moment exists
        pipes = {"full": full,
                 "far_l1": switch_to_far(full, model, plan, where / "far", **ck),
                 "far_l1_frozen_emb": switch_to_far(full, model, plan, where / "far_emb",
                                                    freeze=_embeddings(), **ck)}
        load = os.getloadavg()
        times = _interleaved(pipes, batches[1:], opt)
        med = {k: 1000 * statistics.median(v) for k, v in times.items()}
        key = f"{batch}x{seq}"
        out[key] = {
            "batch": batch, "seq": seq, "tokens": batch * seq,
            "step_ms_median": med,
            "step_time_ratio_vs_full": {k: med[k] / med["full"] for k in med if k != "full"},
            "paired_step_ratio_median": {
                k: statistics.median(np.array(times[k]) / np.array(times["full"]))
                for k in times if k != "full"},
            "flop_bound": {k: flop_ceiling(model.dims, batch, seq, plan.learners,
                                           k == "far_l1_frozen_emb")
                           for k in ("far_l1", "far_l1_frozen_emb")},
            "breakdown_ms": _breakdown(pipes, batches[1], a.reps),
            "embed_bwd_ms": _embed_bwd_ms(model, batch, seq),
            "loadavg": load, "steps": a.sweep_steps}
        print(f"  {key}: {out[key]['paired_step_ratio_median']}", file=sys.stderr)
        del pipes, full
    return out


def _plot(sweep: dict, path: Path) -> str:
    """Paired step-time ratio vs tokens per step, with the FLOP bounds and the 0.7 goal."""
    from control.svg import Series, line_chart

    pts = sorted(sweep.values(), key=lambda v: v["tokens"])
    xs = [v["tokens"] for v in pts]
    label = {"far_l1": "FAR", "far_l1_frozen_emb": "FAR + frozen embeddings"}
    series = [Series(label[k], xs, [v["paired_step_ratio_median"][k] for v in pts], markers=True)
              for k in label]
    series += [Series(f"{label[k]}: FLOP bound", xs,
                      [v["flop_bound"][k]["ratio_bound"] for v in pts], dashed=True)
               for k in label]
    series.append(Series("goal 0.7", [xs[0], xs[-1]], [0.7, 0.7], dashed=True, color="#999"))
    path.write_text(line_chart(series, title="FAR step time / full fine-tuning (paired steps)",
                               xlabel="tokens per step (batch x seq)", ylabel="ratio",
                               width=620, height=300))
    return path.name


def run(a: argparse.Namespace) -> dict:
    from bench.bench_pipeline import machine_info
    from control.data import iterate_batches
    from control.far import FarConfig, plan_from_priming, switch_to_far
    from control.job import compile_bundles, load_model, rotten_tomatoes_batches
    from control.local import LocalPipeline, OptimConfig

    load0 = os.getloadavg()
    model = load_model(num_labels=2, head_seed=0)
    ck = {"stages": 1, "batch": a.batch, "seq": a.seq, "configs": {}}
    t0 = time.perf_counter()
    full = LocalPipeline(compile_bundles(model, BUILD / "full", progress=False, **ck))
    compile_full = time.perf_counter() - t0
    train_enc, train_y, test = rotten_tomatoes_batches(model.path / "tokenizer.json", a.seq,
                                                       a.batch, a.eval, 0)
    before = full.evaluate(test)
    opt = OptimConfig(lr=a.lr, warmup_steps=max(1, a.steps // 10), total_steps=a.steps)
    it = iterate_batches(train_enc, train_y, a.batch, 0, 0)
    cfg = FarConfig(retention=a.retention)
    n_prime = cfg.priming_steps(a.steps)
    for _ in range(n_prime):
        full.train_step([next(it)[1].as_dict()], opt)
    primed = full.params()
    pipes = {"full": full}
    compile_far = []
    for sel in ("l1", "random"):
        plan = plan_from_priming(model.weights, primed, model.dims.layers, model.dims.ffn,
                                 FarConfig(retention=a.retention, selection=sel))
        t0 = time.perf_counter()
        pipes[f"far_{sel}"] = switch_to_far(full, model, plan, BUILD / f"far_{sel}", **ck)
        if sel == "l1":
            plan_l1 = plan
        compile_far.append(time.perf_counter() - t0)
        if sel == "l1" and a.frozen_embeddings:   # FAR + the embeddings frozen too
            pipes["far_l1_frozen_emb"] = switch_to_far(
                full, model, plan, BUILD / "far_l1_frozen_emb",
                freeze=_embeddings(), **ck)
    names = list(pipes)
    times: dict[str, list[float]] = {k: [] for k in names}
    losses: dict[str, list[float]] = {k: [] for k in names}
    for s in range(a.steps - n_prime):
        micro = [next(it)[1].as_dict()]
        r = s % len(names)
        for k in names[r:] + names[:r]:               # rotate the order: no mode always goes first
            t0 = time.perf_counter()
            losses[k].append(pipes[k].train_step(micro, opt))
            times[k].append(time.perf_counter() - t0)
    acc = {k: p.evaluate(test) for k, p in pipes.items()}
    brk = _breakdown(pipes, test[0], a.reps)
    layer = _layer_ffn(model, pipes["far_l1"].stages[0].manifest.stage["ffn_learners"], a.batch,
                       a.seq, 3 * a.reps)
    mem = {k: _train_bytes(p) for k, p in pipes.items()}
    dirs = {k: BUILD / k / "stage0" for k in pipes}
    rss = {k: _peak_rss(d, a.batch, a.seq) for k, d in dirs.items()}
    med = {k: 1000 * statistics.median(v) for k, v in times.items()}
    paired = {k: statistics.median(np.array(times[k]) / np.array(times["full"])) for k in names[1:]}
    drop = {k: 100 * (acc["full"][1] - acc[k][1]) for k in names[1:]}
    ffn_dw = 2 * 2 * a.batch * a.seq * model.dims.hidden * model.dims.ffn * model.dims.layers
    res = {
        "machine": machine_info(), "loadavg_before": load0, "loadavg_after": os.getloadavg(),
        "settings": {"model": model.model_id, "steps": a.steps, "priming_steps": n_prime,
                     "batch": a.batch, "seq": a.seq, "lr": a.lr, "retention": a.retention,
                     "learners_per_layer": pipes["far_l1"].stages[0].manifest.stage["ffn_learners"],
                     "ffn": model.dims.ffn, "eval_examples": len(test) * a.batch, "stages": 1,
                     "kernel_configs": "defaults (no tuning database)"},
        "step_ms_median": med,
        "step_time_ratio_vs_full": med["far_l1"] / med["full"],
        "random_step_time_ratio_vs_full": med["far_random"] / med["full"],
        "paired_step_ratio_median": paired,
        "breakdown_ms": brk,
        "one_layer_ms": layer,
        "accuracy_before": before[1],
        "accuracy": {k: v[1] for k, v in acc.items()},
        "eval_loss": {k: v[0] for k, v in acc.items()},
        "accuracy_drop_points": drop["far_l1"],
        "random_accuracy_drop_points": drop["far_random"],
        "train_loss_last10": {k: float(np.mean(v[-10:])) for k, v in losses.items()},
        "train_state_mib": {k: {n: v / MIB for n, v in m.items()} for k, m in mem.items()},
        "peak_rss_mib": rss,
        "memory_ratio_vs_full": mem["far_l1"]["total"] / mem["full"]["total"],
        "frozen_emb": ({"step_time_ratio_vs_full": med["far_l1_frozen_emb"] / med["full"],
                        "accuracy_drop_points": drop["far_l1_frozen_emb"],
                        "frozen_param_share": _frozen_share(pipes["far_l1_frozen_emb"])}
                       if "far_l1_frozen_emb" in pipes else None),
        "ffn_weight_grad_gflop_per_step": ffn_dw / 1e9,
        "compile_seconds": {"full": compile_full, "far": compile_far},
        "token_lengths": _token_lengths(model),
    }
    if a.sweep:
        pipes.clear()                                 # free the primary pipelines first
        full = None
        res["shape_sweep"] = _sweep(model, plan_l1, a)
        res["settings"]["sweep"] = {"shapes": [f"{b}x{t}" for b, t in a.sweep],
                                    "steps": a.sweep_steps,
                                    "order": "interleaved, rotating; one process, one stage"}
        res["plots"] = [_plot(res["shape_sweep"], a.out.parent / "far_step_ratio.svg")]
    res["goal"] = {"step_time_ratio_le_0.7": res["step_time_ratio_vs_full"] <= 0.7,
                   "accuracy_drop_le_1_point": res["accuracy_drop_points"] <= 1.0}
    return res


def _shapes(text: str) -> list[tuple[int, int]]:
    out = []
    for item in (x for x in text.split(",") if x):
        b, _, t = item.rpartition("x")
        out.append((int(b) if b else 0, int(t)))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--retention", type=float, default=0.4)
    p.add_argument("--frozen-embeddings", action=argparse.BooleanOptionalAction, default=True,
                   help="also run FAR with the embeddings frozen (the FAR paper's '60%% of "
                        "parameters frozen' operating point; MiniLM's embeddings are 53%%)")
    p.add_argument("--eval", type=int, default=1024, help="held-out sentences")
    p.add_argument("--reps", type=int, default=8, help="breakdown repetitions per mode")
    p.add_argument("--sweep", type=_shapes, default=_shapes("1x32,2x32,4x32,8x32,8x64,8x128"),
                   help="shapes BATCHxSEQ of the step-time sweep (full vs FAR vs FAR + frozen "
                        "embeddings; a bare SEQ uses --batch); '' to skip")
    p.add_argument("--sweep-steps", type=int, default=16, help="interleaved steps per shape")
    p.add_argument("--out", type=Path, default=OUT, help="results file")
    p.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.rss_child:
        _rss_child(a.rss_child, a.batch, a.seq)
        return 0
    a.sweep = [(b or a.batch, t) for b, t in a.sweep]
    res = run(a)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=1))
    keys = ("step_ms_median", "step_time_ratio_vs_full", "random_step_time_ratio_vs_full",
            "paired_step_ratio_median", "one_layer_ms", "accuracy", "accuracy_drop_points",
            "random_accuracy_drop_points", "peak_rss_mib", "memory_ratio_vs_full", "goal")
    print(json.dumps({k: res[k] for k in keys}, indent=1))
    for shape, r in res.get("shape_sweep", {}).items():
        print(f"{shape}: step ms {r['step_ms_median']}, paired {r['paired_step_ratio_median']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
