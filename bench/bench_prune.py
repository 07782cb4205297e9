"""Benchmark: dead-code pruning of compiled stages (`compiler.build.prune`), on vs off.

    .venv/bin/python bench/bench_prune.py                  # ~10 min on 2 cores
    .venv/bin/python bench/bench_prune.py --batch 2 --seq 32 --steps 8

The stage graphs emit every gradient kernel of a layer and return only the trained tensors'
gradients; TVM's build pipeline has no dead-code pass, so until `prune` the frozen weights'
gradient GEMMs still ran in PEFT modes. Per mode (full fine-tuning, BitFit, LoRA r 8, bottleneck
adapters r 16, and FAR at retention 0.4 with the embeddings frozen) the whole model (one stage,
dropout on) is compiled twice, with and without the pass (the "off" build in its own compile
cache), and both train on the same real batches, their steps interleaved with the order rotating.
Reported: median step ms, the paired per-step ratio on/off, the number of kernel calls in
`stage_backward` before and after pruning, and that both builds give the same losses (the pass
removes only calls nothing reads; bit-identical expected). Results: bench/results/prune.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

OUT = ROOT / "bench" / "results" / "prune.json"
BUILD = ROOT / "build" / "bench_prune"


def _backward_calls(mod) -> int:
    import tvm
    from tvm import relax

    n = 0

    def visit(e):
        nonlocal n
        if isinstance(e, relax.Call) and e.op in (tvm.ir.Op.get("relax.call_tir"),
                                                 tvm.ir.Op.get("relax.call_tir_inplace")):
            n += 1
    relax.analysis.post_order_visit(mod["stage_backward"].body, visit)
    return n


def _specs(model, batch: int, seq: int) -> dict:
    """mode -> (StageSpec, weights) for the whole model as one stage."""
    from compiler.adapters import adapter_init
    from compiler.far import far_spec, reconfigure, select
    from compiler.model_spec import EMBED_PARAMS, stage_specs
    from compiler.peft import lora_init, peft_spec

    (base,) = stage_specs([(0, model.dims.layers)], batch, seq)
    d = model.dims
    out = {"full": (base, model.weights)}
    for method, kw in (("bitfit", {}), ("lora", {"rank": 8}), ("adapter", {"adapter_size": 16})):
        spec = peft_spec(base, d, method, **kw)
        w = dict(model.weights)
        if method == "lora":
            w.update(lora_init(d, spec, seed=0))
        elif method == "adapter":     # up = 0 at init: give it values so every path is live
            w.update({k: (v if not k.endswith("up.weight") else
                          np.random.default_rng(1).standard_normal(v.shape).astype(v.dtype) * 1e-2)
                      for k, v in adapter_init(d, spec, seed=0).items()})
        out[method] = (spec, w)
    rng = np.random.default_rng(0)
    plan = select({li: rng.random(d.ffn) for li in range(d.layers)}, 624,
                  freeze=tuple(n for n, _ in EMBED_PARAMS))
    out["far_emb_frozen"] = (far_spec(base, plan), reconfigure(model.weights, plan))
    return out


def run(a: argparse.Namespace) -> dict:
    from bench.bench_pipeline import machine_info
    import compiler.build as cb
    from compiler.arch import get_arch
    from compiler.build import _graph, build_bundle
    from control.job import load_model, rotten_tomatoes_batches
    from control.data import iterate_batches
    from control.local import LocalPipeline, OptimConfig

    load0 = os.getloadavg()
    model = load_model(num_labels=2, head_seed=0)
    arch = get_arch("host")
    enc, y, _ = rotten_tomatoes_batches(model.path / "tokenizer.json", a.seq, a.batch, a.batch, 0)
    it = iterate_batches(enc, y, a.batch, 0, 0)
    batches = [next(it)[1].as_dict() for _ in range(a.steps)]
    opt = OptimConfig(lr=1e-4)
    real_prune, off_cache = cb.prune, tempfile.mkdtemp(prefix="edgert-noprune-")
    res: dict = {"machine": machine_info(), "loadavg_before": load0,
                 "settings": {"batch": a.batch, "seq": a.seq, "steps": a.steps, "stages": 1,
                              "kernel_configs": "defaults (no tuning database)"},
                 "modes": {}}
    for mode, (spec, w) in _specs(model, a.batch, a.seq).items():
        if a.modes and mode not in a.modes:
            continue
        mod = _graph(model.dims, spec, arch, "float32", {}).build(optimizer=True)
        calls = {"emitted": _backward_calls(mod), "after_prune": _backward_calls(real_prune(mod))}
        pipes = {}
        for on in (True, False):
            old = os.environ.get("EDGERT_CACHE")
            if not on:          # own cache: the "off" library must not land under the real key
                os.environ["EDGERT_CACHE"] = off_cache
                cb.prune = lambda m: m
            try:
                d = BUILD / mode / ("on" if on else "off")
                build_bundle(d, model.dims, spec, arch, w, model.model_id, model.sha256,
                             configs={})
            finally:
                cb.prune = real_prune
                if not on:
                    if old is None:
                        os.environ.pop("EDGERT_CACHE", None)
                    else:
                        os.environ["EDGERT_CACHE"] = old
            pipes["on" if on else "off"] = LocalPipeline([d])
        times: dict = {"on": [], "off": []}
        losses: dict = {"on": [], "off": []}
        for s, b in enumerate(batches):
            for k in (("on", "off") if s % 2 == 0 else ("off", "on")):
                t0 = time.perf_counter()
                losses[k].append(pipes[k].train_step([b], opt))
                times[k].append(time.perf_counter() - t0)
        on, off = np.array(times["on"][1:]), np.array(times["off"][1:])   # step 1: warm-up
        res["modes"][mode] = {
            "step_ms_median": {"on": 1000 * float(np.median(on)), "off": 1000 * float(np.median(off))},
            "paired_ratio_on_vs_off": float(statistics.median(on / off)),
            "backward_calls": calls,
            "losses_identical": losses["on"] == losses["off"],
            "max_loss_diff": float(np.max(np.abs(np.array(losses["on"]) - np.array(losses["off"])))),
            "loadavg": os.getloadavg()}
        print(f"  {mode}: {res['modes'][mode]['paired_ratio_on_vs_off']:.3f} "
              f"({calls['emitted']} -> {calls['after_prune']} calls)", file=sys.stderr)
        del pipes
    res["loadavg_after"] = os.getloadavg()
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--steps", type=int, default=13, help="interleaved steps per build (1 warm-up)")
    p.add_argument("--modes", type=lambda t: [x for x in t.split(",") if x], default=[],
                   help="subset of full,bitfit,lora,adapter,far_emb_frozen (default: all)")
    p.add_argument("--out", type=Path, default=OUT)
    a = p.parse_args()
    res = run(a)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=1))
    print(json.dumps({k: {"ratio": v["paired_ratio_on_vs_off"], **v["step_ms_median"]}
                      for k, v in res["modes"].items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
