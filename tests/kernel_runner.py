"""Run exported kernels or a whole stage bundle with TVM's runtime only (no compiler): used under
qemu-aarch64 by the arm64 checks.

    python -m tests.kernel_runner CASES.npz OUT.npz LIB.so [LIB.so ...]
    python -m tests.kernel_runner --stage BUNDLE BATCH.npz OUT.npz

Kernels: CASES.npz holds, for case i, ``{i}/in{j}`` (inputs in PrimFunc order) and ``{i}/out``
(zeros of the output's shape and dtype); LIB i is case i's library (function ``main``); OUT.npz
gets ``{i}`` = the output. Stage: a whole-model bundle (K = 1) runs forward + backward on the
batch with dropout off (edgert.runtime.TvmStage, as a board does); OUT.npz gets ``loss`` and
``grad/<name>`` of every trained tensor. Imports only numpy and edgert.
"""

from __future__ import annotations

import sys

import numpy as np


def kernels(cases: str, out_path: str, libs: list[str]) -> None:
    from edgert.runtime import load_runtime, to_dev, to_np

    rt = load_runtime(threads=1, block_torch=True)
    data = np.load(cases)
    outs = {}
    for i, lib in enumerate(libs):
        ins = [data[f"{i}/in{j}"] for j in range(sum(k.startswith(f"{i}/in") for k in data))]
        out = to_dev(np.array(data[f"{i}/out"]))
        rt.load_module(lib)["main"](*[to_dev(a) for a in ins], out)
        outs[str(i)] = to_np(out).copy()
    np.savez(out_path, **outs)


def stage(bundle: str, batch_path: str, out_path: str) -> None:
    from edgert.runtime import TvmStage, to_np

    st = TvmStage.load(bundle, threads=1, block_torch=True)
    batch = np.load(batch_path)
    seed = np.array([1, 0], np.int64)
    outs, saved = st.forward([np.ascontiguousarray(batch[t.name]) for t in
                              st.manifest.data_inputs], seed)
    _, grads = st.backward(saved, np.ones(1, st.manifest.dtype), seed)
    res = {"loss": to_np(outs[0]).copy()}
    res.update({f"grad/{t.name}": to_np(g).copy()
                for t, g in zip(st.manifest.trainable, grads, strict=True)})
    np.savez(out_path, **res)


if __name__ == "__main__":
    a = sys.argv[1:]
    if a and a[0] == "--stage":
        stage(*a[1:4])
    else:
        kernels(a[0], a[1], a[2:])
