"""Record the main job's per-step losses and final weights, bit for bit, or compare with a record.

    python scripts/record_quickstart.py --out tests/golden/quickstart_baseline.json      # all
    python scripts/record_quickstart.py --variants short_run,short_boards \
        --compare tests/golden/quickstart_baseline.json

Variants (each runs the job through its public entry point, as the commands do):

    quickstart      `edgert run --out DIR` with every default (RunConfig(): the planner's split over
                    2 local boards, 60 steps of 2 x 8 x 64 tokens, checkpoints every 10 steps)
    short_run       the same Run on a 4-step, 2 x 2 x 16-token config (split 0:3,3:6)
    short_boards    `edgert train` (control.job.finetune) on 2 local boards, the short config
    short_inprocess `edgert train --in-process`, the short config

Recorded per variant: every step's loss (float.hex, so the comparison is exact), the held-out
evaluations, and the sha256 of every final weight tensor (the last checkpoint's weights and AdamW
moments for runs; the exported Hugging Face tensors for `finetune`). Bit-identical results are only
expected on the same machine and thread settings: the record carries both, and `--compare`
refuses to compare across machines.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

# Fixed threads: the in-process runner's TVM pool reads this once, on first use.
os.environ.setdefault("TVM_NUM_THREADS", str(len(os.sched_getaffinity(0))))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

SHORT = {"split": "0:3,3:6", "steps": 4, "batch": 2, "micro_batches": 2, "seq": 16}
VARIANTS = ("quickstart", "short_run", "short_boards", "short_inprocess")


def machine() -> dict:
    """What the bits depend on: CPU model and flags, core count, TVM version."""
    import tvm

    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = next((ln.split(":", 1)[1].strip() for ln in info.splitlines()
                  if ln.startswith("model name")), platform.processor())
    flags = next((ln.split(":", 1)[1].strip() for ln in info.splitlines()
                  if ln.startswith("flags")), "")
    return {"cpu": model, "cpu_flags_sha256": hashlib.sha256(flags.encode()).hexdigest()[:16],
            "cores": len(os.sched_getaffinity(0)), "tvm": tvm.__version__,
            "python": platform.python_version()}


def tensor_sha(a: np.ndarray) -> str:
    a = np.ascontiguousarray(a)
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.tobytes())
    return h.hexdigest()


def hashes(d: dict[str, np.ndarray]) -> dict[str, str]:
    return {k: tensor_sha(v) for k, v in sorted(d.items())}


def record_run(cfg_kw: dict, out: Path) -> dict:
    from control.run import Run, RunConfig

    cfg = RunConfig(**cfg_kw)
    run = Run(cfg, out)
    run.start()
    params, opt = run.latest_checkpoint().load()
    return {"config": cfg.to_dict(), "steps_done": run.step,
            "losses": [float(e.data["loss"]).hex() for e in run.events.of("step")],
            "evals": [{k: e.data[k] for k in ("step", "loss", "accuracy")}
                      for e in run.events.of("eval")],
            "plan": [e.data["ranges"] for e in run.events.of("plan")],
            "params": hashes(params), "moments": hashes(opt)}


def record_finetune(boards: bool, out: Path) -> dict:
    from safetensors.numpy import load_file

    from control.job import finetune

    kw = {**SHORT, "stages": None, "eval_examples": 8, "configs": {}}
    rep = finetune(out_dir=out, boards=boards, **kw)
    exported = load_file(str(out / "hf_model" / "model.safetensors"))
    return {"config": kw, "losses": [float(x).hex() for x in rep.losses],
            "evals": [rep.before, rep.after], "params": hashes(exported)}


def record(variant: str, work: Path) -> dict:
    print(f"== {variant}", file=sys.stderr, flush=True)
    if variant == "quickstart":
        return record_run({}, work / variant)
    if variant == "short_run":
        return record_run({**SHORT, "eval_examples": 8, "checkpoint_every": 2,
                           "export_hf": False}, work / variant)
    return record_finetune(variant == "short_boards", work / variant)


def compare(got: dict, want: dict) -> list[str]:
    """Differences between two records of one variant (empty = bit-identical)."""
    bad = []
    for key in ("losses", "params", "moments", "evals"):
        if key in want and got.get(key) != want[key]:
            if isinstance(want[key], dict):
                diff = sorted(k for k in set(want[key]) | set(got.get(key, {}))
                              if want[key].get(k) != got.get(key, {}).get(k))
                bad.append(f"{key}: {len(diff)} differ, e.g. {diff[:3]}")
            else:
                bad.append(f"{key}: {got.get(key)} != {want[key]}")
    return bad


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", type=Path, default=None, help="write the record here (JSON)")
    ap.add_argument("--compare", type=Path, default=None, help="compare with this record")
    ap.add_argument("--work", type=Path, default=None, help="run directories (default: a temp dir)")
    a = ap.parse_args()
    names = [v for v in a.variants.split(",") if v]
    if unknown := sorted(set(names) - set(VARIANTS)):
        ap.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    want = json.loads(a.compare.read_text()) if a.compare else None
    here = machine()
    if want is not None and want["machine"] != here:
        print(f"record is from another machine ({want['machine']}); this is {here}: bits are "
              f"only comparable on the same machine", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="edgert-record-") as tmp:
        work = a.work or Path(tmp)
        rec = {"machine": here, "threads": {
            "TVM_NUM_THREADS (in-process runner)": os.environ["TVM_NUM_THREADS"],
            "boards": "default rule: cores // boards per board process"},
            "variants": {v: record(v, work) for v in names}}
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(rec, indent=1) + "\n")
        print(f"wrote {a.out}", file=sys.stderr)
    status = 0
    for v, got in rec["variants"].items():
        if want is not None:
            bad = compare(got, want["variants"][v]) if v in want["variants"] else ["not recorded"]
            print(f"{v}: {'bit-identical' if not bad else 'DIFFERS: ' + '; '.join(bad)}")
            status |= bool(bad)
    return status


if __name__ == "__main__":
    sys.exit(main())
