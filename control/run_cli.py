"""`edgert run` and `edgert resume`: a Run in the foreground with a progress bar and clean Ctrl-C.

    edgert run run.toml --out runs/night     # starts, or continues runs/night if it holds this run
    edgert resume runs/night                 # continue from the newest valid checkpoint

Ctrl-C (SIGINT) or SIGTERM: the run stops at the next step boundary, writes a checkpoint and the
report, and the command prints how to continue (exit code 130). A second Ctrl-C aborts at once
(the newest checkpoint on disk still holds).
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Any

from control.events import Event
from control.progress import Progress
from control.run import Run
from control.run_config import RunConfig
from edgert.errors import ConfigError


class _Console:
    """Progress bar and alerts on stderr, fed by the run's events."""

    def __init__(self, run: Run) -> None:
        self.bar = Progress(run.config.steps, "train")
        self.run = run

    def __call__(self, ev: Event) -> None:
        d = ev.data
        if ev.kind == "step":
            self.bar.n = int(d["step"]) - 1
            self.bar.update(f"loss {d['loss']:.4f}")
        elif ev.kind == "alert":
            print(f"\n  [{d.get('level')}] {d.get('text')}", file=sys.stderr, flush=True)
        elif ev.kind == "plan":
            print(f"  plan ({d.get('reason')}): layers {d.get('ranges')} on {d.get('boards')}",
                  file=sys.stderr, flush=True)
        elif ev.kind == "eval":
            print(f"\n  step {d['step']}: held-out loss {d['loss']:.4f}, accuracy "
                  f"{100 * d['accuracy']:.1f}%", file=sys.stderr, flush=True)
        elif ev.kind == "state" and d.get("state") in ("starting", "stopping", "stopped"):
            print(f"  {d['state']} at step {d.get('step')}", file=sys.stderr, flush=True)


def run_command(config: Path | None, out: Path, *, resume_only: bool) -> int:
    """The body of `edgert run` / `edgert resume`; returns the exit code."""
    if resume_only:
        saved = Path(out) / "config.json"
        if not saved.is_file():
            raise ConfigError(f"{out} is not a run directory (no config.json); start a run with "
                              f"`edgert run [run.toml] --out {out}`")
        cfg = RunConfig.from_json(saved)
    else:
        cfg = RunConfig.from_toml(config) if config is not None else RunConfig()
    run = Run(cfg, out)
    run.events.subscribe(_Console(run))
    hits = {"n": 0}

    def on_signal(signum: int, frame: Any) -> None:
        hits["n"] += 1
        if hits["n"] > 1:
            raise KeyboardInterrupt
        print("\n  stopping at the next step boundary with a checkpoint (Ctrl-C again to abort)",
              file=sys.stderr, flush=True)
        run.stop()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        run.start()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    print(f"\n{run.state} at step {run.step}/{cfg.steps}; report: {run.dir / 'report.html'}, "
          f"metrics: {run.dir / 'metrics.json'}, checkpoints: {run.checkpoint_dir}")
    if run.state == "finished":
        evals = [e.data for e in run.events.of("eval")]
        if len(evals) >= 2:
            a, b = evals[0], evals[-1]
            print(f"  held-out loss     {a['loss']:.4f} -> {b['loss']:.4f}\n"
                  f"  held-out accuracy {100 * a['accuracy']:.1f}% -> {100 * b['accuracy']:.1f}%"
                  f"  ({b.get('examples', '?')} sentences)")
        for e in run.events.of("board")[-cfg.boards:]:
            d = e.data
            print(f"  {d.get('name')}: stage {d.get('stage')}, peak RSS "
                  f"{d.get('peak_rss_mib', 0):.0f} MiB")
        if cfg.export_hf:
            hf = run.export_hf(run.dir / "hf_model")
            print(f"  fine-tuned Hugging Face model: {hf}")
    if run.state == "stopped":
        again = f"edgert run {config} --out {out}" if config else f"edgert run --out {out}"
        print(f"continue with: edgert resume {out}   (or the same command: {again})")
        return 130
    return 0
