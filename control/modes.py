"""The modes every job without a layout change uses: full fine-tuning, PEFT and the decoder's.

A mode is how a kind of fine-tuning plugs into the one loop (`control.loop.Mode`): what to
compile for a split, how the deployed weights map to the dense layout, what a checkpoint carries,
what happens at a step boundary. `Dense` is the mode whose deployed layout *is* the dense one and
that never changes during a run; what it compiles is its compile function's business (full BERT
stages, PEFT stages, decoder stages). FAR, which reconfigures the FFNs after priming, is
`control.far.FarMode`; a dense run never imports it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

Compile = Callable[[str, Path], list[Path]]      # (split "0:3,3:6", out dir) -> stage bundles


class Dense:
    """Stages compiled by `compile_fn`, trained as they are (see the module docstring).

    Examples
    --------
    >>> mode = Dense(lambda split, out: compile_bundles(model, out, split=split))  # doctest: +SKIP
    >>> mode.compile("0:3,3:6", Path("build/bundles"))                              # doctest: +SKIP
    """

    def __init__(self, compile_fn: Compile) -> None:
        self.compile_fn = compile_fn
        self._done: dict[tuple[str, Path], list[Path]] = {}

    def compile(self, split: str, out: Path) -> list[Path]:
        """Compiled once per split and directory in this process (the compile cache serves the
        libraries across processes)."""
        key = (split, Path(out))
        if key not in self._done:
            self._done[key] = self.compile_fn(split, Path(out))
        return list(self._done[key])

    def dense(self, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return params

    def to_deployed(self, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return params

    def checkpoint_meta(self) -> dict[str, Any]:
        return {}

    def restore(self, meta: dict[str, Any] | None) -> None:
        """Nothing to restore: every checkpoint of a dense run is in the dense layout."""

    def at_boundary(self, loop: Any) -> bool:
        return False
