"""Run exported kernel libraries with TVM's runtime only (no compiler): used under qemu-aarch64.

    python -m tests.kernel_runner CASES.npz OUT.npz LIB.so [LIB.so ...]

CASES.npz holds, for case i, arrays ``{i}/in{j}`` (inputs in PrimFunc order) and ``{i}/out``
(the output's shape and dtype, zeros); LIB i is case i's library (function ``main``). OUT.npz gets
``{i}`` = the output. Imports only numpy and edgert.runtime (tvm_ffi + libtvm_runtime).
"""

from __future__ import annotations

import sys

import numpy as np


def main(argv: list[str]) -> None:
    from edgert.runtime import load_runtime, to_dev, to_np

    cases, out_path, libs = argv[0], argv[1], argv[2:]
    rt = load_runtime(threads=1, block_torch=True)
    data = np.load(cases)
    outs = {}
    for i, lib in enumerate(libs):
        ins = [data[f"{i}/in{j}"] for j in range(sum(k.startswith(f"{i}/in") for k in data))]
        out = to_dev(np.array(data[f"{i}/out"]))
        rt.load_module(lib)["main"](*[to_dev(a) for a in ins], out)
        outs[str(i)] = to_np(out).copy()
    np.savez(out_path, **outs)


if __name__ == "__main__":
    main(sys.argv[1:])
