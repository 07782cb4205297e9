"""The forward-only `stage_loss` entry of whole-model bundles (forward-gradient clients).

Same bundle shape as test_fwdgrad_boards.py (K = 1, batch 2 x 16 tokens), so the session's compile
cache builds the library once; its own bundle directory, because rewriting a library another
module's stage has loaded crashes that process.
"""

from __future__ import annotations

import numpy as np
import pytest

from control.local import stage_inputs
from edgert.artifact import STAGE_LOSS
from edgert.runtime import TvmStage

pytestmark = pytest.mark.slow
B, T = 2, 16


@pytest.fixture(scope="module")
def stage(whole_model_bundle):
    return TvmStage.load(whole_model_bundle)     # batch B x T (tests/conftest.py)


def test_stage_loss_equals_stage_forward_without_dropout(stage, real_batch):
    """stage_loss runs the same kernels as stage_forward with the dropout flag 0, so loss and
    logits agree bitwise (tolerance 0), on two real batches with padding; and it returns only
    (loss, logits), none of the ~40 saved activations."""
    assert STAGE_LOSS in stage.manifest.entries
    for off in (3, 50):
        data = stage_inputs(stage, real_batch(B, T, offset=off), None)
        outs, saved = stage.forward(data, np.array([1, 0], np.int64))
        lossv, logits = stage.loss(data)
        np.testing.assert_array_equal(np.from_dlpack(lossv), np.from_dlpack(outs[0]))
        np.testing.assert_array_equal(np.from_dlpack(logits), np.from_dlpack(outs[1]))
        assert len(saved) > 30


def test_stage_loss_is_dropout_free_and_differs_from_training_forward(stage, real_batch):
    """With dropout on (flag 1), stage_forward's loss differs from stage_loss's: the entry really
    switched dropout off rather than sharing a seed."""
    data = stage_inputs(stage, real_batch(B, T, offset=7), None)
    on, _ = stage.forward(data, np.array([5, 1], np.int64))
    lossv, _ = stage.loss(data)
    assert float(np.from_dlpack(on[0])[0]) != float(np.from_dlpack(lossv)[0])
