"""Forward-gradient federated fine-tuning (LoRA, BitFit) vs backprop (LoRA, full) on local boards.

    .venv/bin/python bench/bench_fwdgrad.py [--clients 3] [--rounds 60] [--batch 8] [--seq 32]

Runs, on Rotten Tomatoes with all-MiniLM-L6-v2 + a new head, each on real board processes:
  * forward-gradient LoRA (B factors + classifier; A frozen at its random init), N clients,
    non-IID shards; each client holds the whole LoRA bundle and runs only `stage_loss`;
  * forward-gradient BitFit (biases + LayerNorms + classifier), same clients;
  * backprop LoRA on one board (the same LoRA bundle, AdamW on factors + head);
  * backprop full fine-tuning on one board (K = 1 bundle, AdamW on everything).
Held-out loss/accuracy vs rounds (a backprop step is one round) and vs training wall time (held-out
evaluation excluded), per-round logs (perturbations, noise share, bytes up/down), peak RSS per
board at each phase (idle, uploaded, loaded, end; absolute and above the idle board), and the
ratio `peak_rss_ratio_vs_bp_full`. Writes bench/results/fwdgrad.json and fwdgrad_*.svg plots.
The machine is shared: the load average is recorded at the start and end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_pipeline import machine_info  # noqa: E402

MIB = 2 ** 20


def _mem(c, i: int = 0) -> dict[str, float]:
    s = c.stats(i)
    return {"rss_mib": s["rss"] / MIB, "peak_rss_mib": s["peak_rss"] / MIB}


def _backprop(bundle: Path, model, steps: int, batch: int, seq: int, lr: float, test,
              before: dict, seed: int, eval_every: int) -> dict:
    """Backprop fine-tuning on one board: held-out curve, peak RSS by phase, training seconds."""
    from control.cluster import LocalCluster
    from control.data import iterate_batches
    from control.federated import _eval
    from control.job import rotten_tomatoes_batches
    from control.local import OptimConfig
    from edgert.runtime import TvmStage

    enc, y, _ = rotten_tomatoes_batches(model.path / "tokenizer.json", seq, batch, 0, seed)
    it = iterate_batches(enc, y, batch, seed, 0)
    opt = OptimConfig(lr=lr, warmup_steps=max(1, steps // 10), total_steps=steps)
    st = TvmStage.load(bundle)
    curve = [{"round": 0, "seconds": 0.0, **before}]
    losses, train_s, mem = [], 0.0, {}
    with LocalCluster(1, threads=1, run_seed=seed) as c:
        mem["idle"] = _mem(c)
        c.deploy([bundle], micro_batches=1)
        mem["loaded"] = _mem(c)
        for s in range(steps):
            t0 = time.perf_counter()
            losses.append(c.train_step([next(it)[1].as_dict()], opt))
            train_s += time.perf_counter() - t0
            if (s + 1) % eval_every == 0 or s + 1 == steps:
                if "trained" not in mem:   # before any parameter fetch (its copies add RSS)
                    mem["trained"] = _mem(c)
                ev = _eval(st, c.params(), {}, test)
                curve.append({"round": s + 1, "seconds": train_s, **ev})
    return {"steps": steps, "examples": steps * batch, "lr": lr, "seconds": train_s,
            "trainable": int(sum(t.nbytes for t in st.manifest.trainable) // 4),
            "train_loss_first_last": [losses[0], losses[-1]], "curve": curve,
            "after": {k: curve[-1][k] for k in ("loss", "accuracy", "examples")},
            "memory_phases": mem, "peak_rss_mib": mem["trained"]["peak_rss_mib"],
            "idle_rss_mib": mem["idle"]["peak_rss_mib"]}


def _plots(res: dict, out_dir: Path) -> list[str]:
    """Accuracy vs rounds, accuracy vs wall time, and peak RSS per method as SVG files."""
    from control.svg import Bar, Series, hbar_chart, line_chart

    runs = res["runs"]
    label = {"fwdgrad_lora": "fwd-grad LoRA", "fwdgrad_bitfit": "fwd-grad BitFit",
             "backprop_lora": "backprop LoRA", "backprop_full": "backprop full"}
    def series(x: str) -> list:
        return [Series(label[k], [p[x] for p in r["curve"]], [100 * p["accuracy"] for p in r["curve"]],
                       dashed=k.startswith("backprop"), markers=True) for k, r in runs.items()]
    files = {
        "fwdgrad_accuracy_rounds.svg": line_chart(
            series("round"), title="held-out accuracy vs rounds (backprop: 1 step = 1 round)",
            xlabel="round", ylabel="accuracy %", width=560, height=280),
        "fwdgrad_accuracy_time.svg": line_chart(
            series("seconds"), title="held-out accuracy vs training wall time",
            xlabel="seconds", ylabel="accuracy %", width=560, height=280),
        "fwdgrad_memory.svg": hbar_chart(
            [Bar(f"{label[k]} (above idle {r['peak_rss_mib'] - r['idle_rss_mib']:.0f})",
                 r["peak_rss_mib"], note=f"{r['peak_rss_mib']:.0f} MiB") for k, r in runs.items()],
            title="peak RSS per board (MiB)", xlabel="MiB", width=560),
    }
    for name, svg in files.items():
        (out_dir / name).write_text(svg)
    return list(files)


def _fg_summary(rep: dict) -> None:
    """Per-run peak over its boards and its idle baseline (max over boards)."""
    rep["idle_rss_mib"] = max(m["peak_rss_mib"] for m in rep["memory_phases"]["idle"])
    rep["peak_rss_mib_per_board"] = rep["peak_rss_mib"]
    rep["peak_rss_mib"] = max(rep["peak_rss_mib"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--k", type=int, default=8, help="perturbations per client and round (start)")
    ap.add_argument("--k-max", type=int, default=8)
    ap.add_argument("--var-threshold", type=float, default=0.0)
    ap.add_argument("--pool", type=int, default=4, help="cosine sampler pool factor")
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--lr-bitfit", type=float, default=0.02)
    ap.add_argument("--lr-lora", type=float, default=0.03)
    ap.add_argument("--bp-steps", type=int, default=120, help="= rounds x clients examples")
    ap.add_argument("--alpha", type=float, default=1.0, help="non-IID Dirichlet alpha")
    ap.add_argument("--eval", type=int, default=128)
    ap.add_argument("--eval-every", type=int, default=5, help="forward-gradient rounds")
    ap.add_argument("--bp-eval-every", type=int, default=20, help="backprop steps")
    ap.add_argument("--only", default="", help="comma list of runs (default all)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "fwdgrad.json")
    a = ap.parse_args()

    from control.federated import _eval, compile_lora_bundle, fwdgrad_finetune
    from control.fwdgrad import FwdGradConfig
    from control.job import compile_bundles, load_model, rotten_tomatoes_batches
    from edgert.runtime import TvmStage

    model = load_model(None, num_labels=2, head_seed=0)
    work = Path(os.environ.get("EDGERT_BENCH_DIR", "/tmp/edgert-bench-fwdgrad"))
    t0 = time.perf_counter()
    full = compile_bundles(model, work / "bundles", stages=1, batch=a.batch, seq=a.seq,
                           progress=True)[0]
    lora = compile_lora_bundle(model, work / "lora" / "stage0", batch=a.batch, seq=a.seq)
    compile_s = time.perf_counter() - t0
    _, _, test = rotten_tomatoes_batches(model.path / "tokenizer.json", a.seq, a.batch, a.eval, 0)
    base = TvmStage.load(full)
    before = _eval(base, base.params_numpy(), {}, test)
    res: dict = {"machine": machine_info(), "loadavg_start": os.getloadavg(),
                 "settings": vars(a) | {"out": str(a.out)}, "compile_seconds": compile_s,
                 "before": before, "runs": {}}
    fg = {"fwdgrad_lora": ("lora", lora, a.lr_lora), "fwdgrad_bitfit": ("bitfit", full, a.lr_bitfit)}
    only = set(filter(None, a.only.split(",")))
    for name, (method, bundle, lr) in fg.items():
        if only and name not in only:
            continue
        print(f"{name} ...", file=sys.stderr)
        cfg = FwdGradConfig(lr=lr, k_init=a.k, k_max=a.k_max, var_threshold=a.var_threshold,
                            pool_factor=a.pool, momentum=a.momentum)
        rep = fwdgrad_finetune(out_dir=work / name, clients=a.clients, rounds=a.rounds,
                               method=method, alpha=a.alpha, batch=a.batch, seq=a.seq,
                               rows_per_round=a.batch, eval_examples=a.eval, cfg=cfg,
                               bundle=bundle, progress=True, eval_every=a.eval_every,
                               resume=False)   # a bench measures from round 0
        rep["examples"] = a.rounds * a.clients * a.batch
        _fg_summary(rep)
        res["runs"][name] = rep
    for name, bundle, lr in (("backprop_lora", lora, 1e-3), ("backprop_full", full, 1e-4)):
        if only and name not in only:
            continue
        print(f"{name} ...", file=sys.stderr)
        res["runs"][name] = _backprop(bundle, model, a.bp_steps, a.batch, a.seq, lr, test,
                                      before, 0, a.bp_eval_every)
    runs = res["runs"]
    if "backprop_full" in runs:
        bp = runs["backprop_full"]
        res["peak_rss_ratio"] = {
            k: {"absolute": r["peak_rss_mib"] / bp["peak_rss_mib"],
                "above_idle": ((r["peak_rss_mib"] - r["idle_rss_mib"])
                               / (bp["peak_rss_mib"] - bp["idle_rss_mib"]))}
            for k, r in runs.items()}
        fw = [k for k in runs if k.startswith("fwdgrad")]
        if fw:   # the worst forward-gradient board against the backprop-full board
            worst = max(fw, key=lambda k: runs[k]["peak_rss_mib"])
            res["peak_rss_ratio_vs_bp_full"] = res["peak_rss_ratio"][worst]["absolute"]
            res["peak_rss_ratio_vs_bp_full_above_idle"] = res["peak_rss_ratio"][worst]["above_idle"]
    res["final_accuracy"] = {k: v["after"]["accuracy"] for k, v in runs.items()}
    res["loadavg_end"] = os.getloadavg()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    res["plots"] = _plots(res, a.out.parent)
    a.out.write_text(json.dumps(res, indent=1, default=str))
    print(json.dumps({"before": res["before"], "final_accuracy": res["final_accuracy"],
                      "peak_rss_ratio": res.get("peak_rss_ratio")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
