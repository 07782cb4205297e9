"""The board side of attention-head splits between a board's backends (docs/head_split.md).

    space.py     candidate splits, the cost model and the crossing search (pure)
    cache.py     versioned on-disk cache of tuned splits
    tuner.py     the cached tuner over measurement callables
    timing.py    warm-up + median timing harness
    arena.py     the shared-memory buffers of a split layer
    workers.py   two pinned worker processes (the backends on this machine), parent side
    worker.py    one worker process (`python -m edgert.head_split.worker`)
    executor.py  the packed attention functions a head-split stage calls, at the tuned split

What the compiler must agree on (AttnShape, kernel and function names) is in edgert/contract.py.
Nothing is imported here: worker.py is also a `python -m` entry point.
"""
