"""Peak RSS (VmHWM, MiB) of a board-like process by phase: runtime, parameter load, 4 forwards.

    .venv/bin/python bench/fwdgrad_memory_probe.py BUNDLE loss|fwd new|legacy

`loss` runs stage_loss, `fwd` stage_forward (saved activations); `legacy` loads the parameters the
old way (safetensors load_file + a 64-byte aligned copy of each tensor). Prints one JSON line.
Used for the in-process rows of docs/fwdgrad.md "Memory"; run each variant in a fresh process.
"""
import json
import sys

import numpy as np



def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024


def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024

bundle, mode, legacy = sys.argv[1], sys.argv[2], sys.argv[3] == "legacy"
from edgert.runtime import TvmStage, load_runtime
out = {"start": hwm()}
load_runtime(1, block_torch=True)
out["runtime"] = hwm()
if legacy:   # the old loader: whole-file read + aligned copies
    import edgert.runtime as R
    from safetensors.numpy import load_file
    def old(path, metas):
        arrays = load_file(str(path))
        return [R.aligned(arrays[t.name]) for t in metas]
    R.read_params = old
st = TvmStage.load(bundle, threads=1, block_torch=True)
out["loaded_peak"] = hwm(); out["loaded_rss"] = rss()
B, T = st.manifest.data_inputs[0].shape
rng = np.random.default_rng(0)
data = [rng.integers(1000, 2000, (B, T)).astype(np.int64), np.zeros((B, T), np.int64),
        np.ones((B, T), np.int64), rng.integers(0, 2, B).astype(np.int64)]
for _ in range(4):
    if mode == "loss":
        st.loss(data)
    else:
        o, s = st.forward(data, np.array([1, 0], np.int64)); del o, s
out["run_peak"] = hwm(); out["run_rss"] = rss()
print(json.dumps(out))
