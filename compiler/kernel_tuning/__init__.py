"""On-board kernel tuning: time each tunable kernel's `config_space` on this board, keep the fastest
correct config in a per-board JSON database, and hand it to the compiler. (Not to be confused with
edgert/head_split/: the board's choice of how to split attention heads between its backends.)

    edgert tune --budget 600            # MiniLM's kernels at B=8, T=128, on this machine
    edgert train                        # compiles with ~/.cache/edgert/tuning/<hostname>.json
    edgert train --no-tuning            # the kernels' own default schedules

Tunable kernels are the builders whose module exposes `config_space` (and `default_config`):
GEMM and attention (docs/kernels.md). Every other kernel keeps its one schedule.

[Note: tuning database]
One JSON file per board (`default_db_path`). A record is keyed by (DB schema, TVM version, target,
dtype, kernel source hash, workload): the target is `Arch`'s target dict + host + threads as
canonical JSON, the source hash covers the builder's module and compiler/kernels/common.py (an edit
makes old timings meaningless), and the workload is the Emitter's key with the perf-neutral kwargs
dropped (`salt`: every layer's attention is the same tuning problem). `keys` lists the Emitter
keys the record's config applies to. Each measured candidate is appended (config, status, min ms)
and the file is rewritten atomically (tmp + os.replace) after every candidate, so an interrupted
run resumes without re-measuring. `pending` names the candidate being measured: if the process
dies inside a kernel, the next run records that candidate as "crashed" and skips it. `choice` is
what the compiler uses (None = keep the default): of the best few verified candidates, re-timed in
interleaved rounds with the default, the one whose median per-round time ratio to the default is
lowest, if below 1 - `min_gain` (on a shared machine a min-of-N taken in a quiet moment is not
enough: see `decide`).
One tuner per DB file at a time (last writer wins).

    workloads.py  the distinct tunable kernels of a model's stages
    db.py         the per-board database and the configs it hands the compiler
    choice.py     which measured candidate the compiler uses (pure, over a record)
    measure.py    compile, verify and time one kernel on this machine
    tuner.py      the budgeted tuning run (`tune`) and its report
"""

from compiler.kernel_tuning.choice import (
    CONFIRM_TOP,
    MIN_GAIN,
    best,
    confirmed,
    decide,
    default_ms,
    finalists,
)
from compiler.kernel_tuning.db import (
    SCHEMA,
    TuningDB,
    board_configs,
    configs_for,
    default_db_path,
    target_id,
)
from compiler.kernel_tuning.measure import Measurer, make_inputs
from compiler.kernel_tuning.tuner import (
    CONFIRM_ROUNDS,
    Event,
    Row,
    TuneReport,
    print_progress,
    tune,
)
from compiler.kernel_tuning.workloads import (
    PERF_NEUTRAL,
    Workload,
    source_hash,
    tunable,
    workload_key,
    workloads,
)

__all__ = ["CONFIRM_ROUNDS", "CONFIRM_TOP", "MIN_GAIN", "PERF_NEUTRAL", "SCHEMA", "Event",
           "Measurer", "Row", "TuneReport", "TuningDB", "Workload", "best", "board_configs",
           "configs_for", "confirmed", "decide", "default_db_path", "default_ms", "finalists",
           "make_inputs", "print_progress", "source_hash", "target_id", "tunable", "tune",
           "workload_key", "workloads"]
