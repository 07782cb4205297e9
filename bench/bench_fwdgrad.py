"""Forward-gradient federated fine-tuning vs backprop full fine-tuning on local boards.

    .venv/bin/python bench/bench_fwdgrad.py [--clients 3] [--rounds 20] [--batch 8] [--seq 32]

Runs, on Rotten Tomatoes with all-MiniLM-L6-v2 + a new head, each on real board processes:
  * forward-gradient BitFit (biases + LayerNorms + classifier), N clients, non-IID shards;
  * forward-gradient head-only, same clients;
  * backprop full fine-tuning on one board (K = 1 bundle, AdamW), the same number of examples.
Writes bench/results/fwdgrad.json: held-out loss/accuracy before/after, per-round logs
(perturbations per client, noise share, bytes up/down per round vs sending gradient tensors),
wall time, peak RSS per board (absolute and above an idle board's baseline) and the ratio
`peak_rss_ratio_vs_bp_full`. The machine is shared: the load average is recorded.
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

import numpy as np  # noqa: E402

from bench.bench_pipeline import machine_info  # noqa: E402


def _backprop(bundle: Path, model, steps: int, batch: int, seq: int, lr: float, test, seed: int):
    """Full fine-tuning with backprop on one board: held-out metrics, peak RSS, seconds."""
    from control.cluster import LocalCluster
    from control.data import iterate_batches
    from control.federated import _eval
    from control.job import rotten_tomatoes_batches
    from control.local import OptimConfig
    from edgert.runtime import TvmStage

    enc, y, _ = rotten_tomatoes_batches(model.path / "tokenizer.json", seq, batch, 0, seed)
    it = iterate_batches(enc, y, batch, seed, 0)
    opt = OptimConfig(lr=lr, warmup_steps=max(1, steps // 10), total_steps=steps)
    t0 = time.perf_counter()
    with LocalCluster(1, threads=1, run_seed=seed) as c:
        idle = c.profile(0)["peak_rss"]
        c.deploy([bundle], micro_batches=1)
        losses = [c.train_step([next(it)[1].as_dict()], opt) for _ in range(steps)]
        peak = c.stats(0)["peak_rss"]
        params = c.params()
    st = TvmStage.load(bundle)
    return {"steps": steps, "examples": steps * batch, "lr": lr,
            "seconds": time.perf_counter() - t0,
            "train_loss_first_last": [losses[0], losses[-1]],
            "after": _eval(st, params, {}, test), "peak_rss_mib": peak / 2 ** 20,
            "idle_rss_mib": idle / 2 ** 20}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=1.0, help="non-IID Dirichlet alpha")
    ap.add_argument("--eval", type=int, default=128)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "fwdgrad.json")
    a = ap.parse_args()

    from control.federated import _eval, fwdgrad_finetune
    from control.fwdgrad import FwdGradConfig
    from control.job import compile_bundles, load_model, rotten_tomatoes_batches
    from edgert.runtime import TvmStage

    model = load_model(None, num_labels=2, head_seed=0)
    work = Path(os.environ.get("EDGERT_BENCH_DIR", "/tmp/edgert-bench-fwdgrad"))
    bundle = compile_bundles(model, work / "bundles", stages=1, batch=a.batch, seq=a.seq,
                             progress=True)[0]
    _, _, test = rotten_tomatoes_batches(model.path / "tokenizer.json", a.seq, a.batch, a.eval, 0)
    base = TvmStage.load(bundle)
    res: dict = {"machine": machine_info(), "loadavg_start": os.getloadavg(),
                 "settings": vars(a) | {"out": str(a.out)},
                 "before": _eval(base, base.params_numpy(), {}, test), "runs": {}}
    runs = {
        "fwdgrad_bitfit": ("bitfit", FwdGradConfig(lr=0.01, k_init=a.k, k_max=a.k)),
        "fwdgrad_head": ("head", FwdGradConfig(lr=0.05, k_init=a.k, k_max=a.k)),
    }
    for name, (method, cfg) in runs.items():
        print(f"{name} ...", file=sys.stderr)
        rep = fwdgrad_finetune(out_dir=work / name, clients=a.clients, rounds=a.rounds,
                               method=method, alpha=a.alpha, batch=a.batch, seq=a.seq,
                               rows_per_round=a.batch, eval_examples=a.eval, cfg=cfg,
                               bundle=bundle, progress=True, eval_every=5)
        rep["examples"] = a.rounds * a.clients * a.batch
        res["runs"][name] = rep
    examples = a.rounds * a.clients * a.batch
    print("backprop full fine-tuning ...", file=sys.stderr)
    bp = _backprop(bundle, model, examples // a.batch, a.batch, a.seq, 1e-4, test, 0)
    res["runs"]["backprop_full"] = bp
    fw = res["runs"]["fwdgrad_bitfit"]
    fw_peak = max(fw["peak_rss_mib"])
    res["peak_rss_ratio_vs_bp_full"] = fw_peak / bp["peak_rss_mib"]
    res["peak_rss_ratio_vs_bp_full_above_idle"] = ((fw_peak - bp["idle_rss_mib"])
                                                   / (bp["peak_rss_mib"] - bp["idle_rss_mib"]))
    res["final_accuracy"] = {k: v["after"]["accuracy"] for k, v in res["runs"].items()}
    res["loadavg_end"] = os.getloadavg()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=1, default=str))
    print(json.dumps({"before": res["before"], "final_accuracy": res["final_accuracy"],
                      "peak_rss_ratio_vs_bp_full": res["peak_rss_ratio_vs_bp_full"],
                      "above_idle": res["peak_rss_ratio_vs_bp_full_above_idle"]}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
