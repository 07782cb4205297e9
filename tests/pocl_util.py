"""PoCL helpers shared by the OpenCL tests: a PoCL context, and running TVM-generated kernels.

`run_pocl` launches every kernel of one dlight-scheduled PrimFunc (compiler.build_inspect.GpuKernel) in
order on PoCL through pyopencl, with the launch shapes read from the scheduled TIR.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from compiler import build_inspect as ci


def pocl_context(tmp_dir):
    """(pyopencl, context, queue) on PoCL's CPU device, or skip with how to install it."""
    cl = pytest.importorskip("pyopencl", reason="pyopencl is not installed (pip install pyopencl)")
    # PoCL's kernel cache goes to this session's tmp dir, not ~/.cache/pocl (before PoCL starts).
    os.environ.setdefault("POCL_CACHE_DIR", str(tmp_dir))
    try:
        platforms = cl.get_platforms()
    except cl.Error as e:   # no ICD at all
        pytest.skip(f"no OpenCL platform ({e}); apt-get install pocl-opencl-icd")
    devs = [d for p in platforms if "Portable Computing Language" in p.name
            for d in p.get_devices()]
    if not devs:
        pytest.skip(f"no PoCL device among OpenCL platforms {[p.name for p in platforms]}; "
                    f"apt-get install pocl-opencl-icd")
    ctx = cl.Context(devs[:1])
    return cl, ctx, cl.CommandQueue(ctx)


def run_pocl(cl, ctx, queue, prog, gk: ci.GpuKernel, ins) -> dict[str, np.ndarray]:
    mf = cl.mem_flags
    bufs = {}
    for name, shape, dtype in gk.params:
        host = ins[name] if name in ins else np.zeros(shape, dtype)
        bufs[name] = cl.Buffer(ctx, mf.READ_WRITE | mf.COPY_HOST_PTR,
                               hostbuf=np.ascontiguousarray(host))
    for name in gk.temps:   # intermediates (possibly sharing storage after StorageRewrite)
        bufs[name] = cl.Buffer(ctx, mf.READ_WRITE | mf.COPY_HOST_PTR,
                               hostbuf=np.zeros(max(gk.temp_pool_bytes, 4), np.uint8))
    for L in gk.launches:   # in order: each reads what the previous ones wrote
        k = cl.Kernel(prog, L.kernel)
        k.set_args(*[bufs[a] for a, _ in L.args])
        cl.enqueue_nd_range_kernel(queue, k, L.global_size, L.block)
    out = {}
    for name, shape, dtype in gk.params:
        if name in gk.outputs:
            out[name] = np.empty(shape, dtype)
            cl.enqueue_copy(queue, out[name], bufs[name])
    queue.finish()
    return out
