"""The host-side compiler: Hugging Face checkpoints -> TVM-compiled pipeline-stage bundles."""

import os as _os

# TVM 0.27's thread pool starts with ONE worker on this kind of 2-vCPU VM unless told otherwise; the
# variable must be set before the pool first runs. Boards set it in edgert.runtime.
_os.environ.setdefault("TVM_NUM_THREADS", str(len(_os.sched_getaffinity(0))))
