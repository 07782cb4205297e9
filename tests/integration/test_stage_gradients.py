"""The foundation check: compiled stages compute BERT's loss and gradients correctly.

Real all-MiniLM-L6-v2 weights, a real tokenized Rotten Tomatoes batch, compared with an independent
float64 PyTorch reference (tests/reference_bert.py, itself checked against Hugging Face transformers in
test_reference.py) that shares no code with compiler/.

Tolerances (observed on this machine in brackets). float32 stages vs the float64 reference: per
tensor, ||g - g_ref|| <= 1e-4 * ||g_ref|| [worst 2.8e-6], loss within 1e-6 relative [1.9e-8].
The key projection's bias has an exactly-zero true gradient (softmax is invariant to adding a
constant per row), so both sides return rounding noise there; tensors whose reference norm is below
1e-7 of the largest gradient norm are held to an absolute bound instead: ||g|| <= 1e-8 * max norm
in float32 [3.3e-10], 1e-17 in float64 [5.3e-19]. A float64 build of the same stages is held to
1e-13 relative per gradient [worst 4.5e-15] and 1e-14 on the loss [0]: that isolates the graph's
mathematics from float32 rounding. K = 1, 2, 3 stages and the uneven split 0:1,1:6 give
bit-identical losses and gradients [every layer runs the same kernels in the same order whatever
the stage boundary], so they are compared exactly.
"""

from __future__ import annotations

import numpy as np
import pytest

from compiler.kernels.common import keep_mask_numpy
from compiler.model_spec import split_qkv
from compiler.stage import _salt
from control.job import compile_bundles, load_model
from control.local import LocalPipeline, seed_vec

from tests import reference_bert as ref

B, T = 4, 32
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model(minilm_dir):
    return load_model(minilm_dir, num_labels=2, head_seed=0)


@pytest.fixture(scope="module")
def batch(real_batch):
    b = real_batch(B, T)
    assert b["attention_mask"].min() == 0, "the batch should contain padding"
    return b


@pytest.fixture(scope="module")
def reference(model, batch):
    return ref.loss_and_grads(model.hf_weights(), batch, config=model.config)


def _grads(model, batch, build_root, name, **kw):
    paths = compile_bundles(model, build_root / name, batch=B, seq=T, progress=False, **kw)
    pipe = LocalPipeline(paths)
    loss, per_stage = pipe.grads(batch)
    merged = {}
    for g in per_stage:
        merged.update(g)
    return loss, split_qkv(merged), pipe


def _compare(grads, ref_grads, rtol, zero_atol=1e-8):
    """Per tensor ||g - g_ref|| <= rtol ||g_ref||; exactly-zero true gradients (key biases):
    ||g|| <= zero_atol x the largest gradient norm. Returns the worst relative error."""
    top = max(np.linalg.norm(g) for g in ref_grads.values())
    worst = {}
    assert grads.keys() == ref_grads.keys()
    for name, r in ref_grads.items():
        g = grads[name].astype(np.float64)
        rn = np.linalg.norm(r)
        if rn < 1e-7 * top:        # exactly-zero true gradient (key bias): absolute bound
            assert np.linalg.norm(g) <= zero_atol * top, (name, np.linalg.norm(g) / top)
            continue
        worst[name] = np.linalg.norm(g - r) / rn
    bad = {k: v for k, v in worst.items() if v > rtol}
    assert not bad, f"relative gradient error above {rtol}: {bad}"
    return max(worst.values())


@pytest.fixture(scope="module")
def k_runs(model, batch, build_root):
    return {k: _grads(model, batch, build_root, f"k{k}", stages=k) for k in (1, 2, 3)}


@pytest.mark.parametrize("k", [1, 2, 3])
def test_float32_stages_match_float64_reference(k_runs, reference, k):
    loss, grads, _ = k_runs[k]
    ref_loss, ref_grads = reference
    assert abs(loss - ref_loss) <= 1e-6 * abs(ref_loss)
    worst = _compare(grads, ref_grads, 1e-4)
    print(f"K={k}: loss {loss:.7f} vs {ref_loss:.7f}; worst relative gradient error {worst:.2e}")


def _assert_same_grads(loss, grads, want_loss, want_grads):
    """Another split of the same model: the same loss and every gradient, bit for bit."""
    assert loss == want_loss
    assert grads.keys() == want_grads.keys()
    bad = [n for n in want_grads if not np.array_equal(grads[n], want_grads[n])]
    assert not bad, f"{len(bad)} gradients differ, e.g. {bad[:3]}"


def test_stage_counts_agree(k_runs):
    l1, g1, _ = k_runs[1]
    for k in (2, 3):
        lk, gk, _ = k_runs[k]
        _assert_same_grads(lk, gk, l1, g1)


@pytest.fixture(scope="module")
def uneven(model, batch, build_root):
    return _grads(model, batch, build_root, "split15", split="0:1,1:6")


def test_explicit_split_equals_even_split(uneven, k_runs):
    loss, grads, pipe = uneven
    assert [st.manifest.stage["first"] for st in pipe.stages] == [0, 1]
    _assert_same_grads(loss, grads, k_runs[1][0], k_runs[1][1])


def test_split_comparison_catches_a_swapped_gradient(uneven, k_runs):
    """The test of the test: the uneven split's gradients with two same-shaped tensors swapped
    (layer 2's and 3's attention output projection) or one scaled by (1 + 1e-7) must fail."""
    loss, grads, _ = uneven
    a, b = (f"encoder.layer.{i}.attention.output.dense.weight" for i in (2, 3))
    swapped = {**grads, a: grads[b], b: grads[a]}
    with pytest.raises(AssertionError, match="2 gradients differ"):
        _assert_same_grads(loss, swapped, k_runs[1][0], k_runs[1][1])
    nudged = {**grads, a: (grads[a] * np.float32(1 + 1e-7)).astype(np.float32)}
    with pytest.raises(AssertionError, match="1 gradients differ"):
        _assert_same_grads(loss, nudged, k_runs[1][0], k_runs[1][1])


def test_training_step_with_dropout_matches_reference(model, batch, k_runs):
    """Dropout on: the same hash masks fed to the reference give the same loss and gradients."""
    _, _, pipe = k_runs[2]
    seed = 12345
    d = model.dims
    masks = {"embeddings": keep_mask_numpy(B * T * d.hidden, seed, _salt(-1, 0), d.hidden_dropout)
             .reshape(B, T, d.hidden),
             "classifier": keep_mask_numpy(B * d.hidden, seed, _salt(-2, 0), d.hidden_dropout).reshape(B, d.hidden)}
    for li in range(d.layers):
        masks[f"encoder.layer.{li}.attention.probs"] = keep_mask_numpy(
            B * d.heads * T * T, seed, _salt(li, 0), d.attn_dropout).reshape(B, d.heads, T, T)
        masks[f"encoder.layer.{li}.attention.output"] = keep_mask_numpy(
            B * T * d.hidden, seed, _salt(li, 1), d.hidden_dropout).reshape(B, T, d.hidden)
        masks[f"encoder.layer.{li}.output"] = keep_mask_numpy(
            B * T * d.hidden, seed, _salt(li, 2), d.hidden_dropout).reshape(B, T, d.hidden)
    ref_loss, ref_grads = ref.loss_and_grads(model.hf_weights(), batch, dropout_masks=masks,
                                             config=model.config)
    loss, _, per_stage = pipe.forward_backward(batch, seed_vec(seed, True), 1.0)
    from edgert.runtime import to_np

    merged = {}
    for st, gs in zip(pipe.stages, per_stage, strict=True):
        merged.update({t.name: to_np(g).copy() for t, g in zip(st.manifest.params, gs, strict=True)})
    print(f"dropout on: loss relative error {abs(loss - ref_loss) / abs(ref_loss):.1e}")
    assert abs(loss - ref_loss) <= 1e-6 * abs(ref_loss)
    worst = _compare(split_qkv(merged), ref_grads, 1e-4)
    print(f"dropout on: worst relative gradient error {worst:.2e}")


def test_float64_build_matches_reference_tightly(model, batch, build_root, reference):
    from compiler.arch import get_arch
    from compiler.build import build_bundle
    from compiler.model_spec import parse_split, stage_specs

    arch = get_arch("host")
    paths = []
    for spec in stage_specs(parse_split(None, 2, model.dims.layers), B, T):
        d = build_root / "f64" / f"stage{spec.index}"
        build_bundle(d, model.dims, spec, arch, model.weights, model.model_id, model.sha256, dtype="float64")
        paths.append(d)
    pipe = LocalPipeline(paths)
    b64 = dict(batch)
    loss, per_stage = pipe.grads(b64)
    merged = {}
    for g in per_stage:
        merged.update(g)
    ref_loss, ref_grads = reference
    print(f"float64 build: loss relative error {abs(loss - ref_loss) / abs(ref_loss):.1e}")
    assert abs(loss - ref_loss) <= 1e-14 * abs(ref_loss)       # observed 0 (bit-equal)
    worst = _compare(split_qkv(merged), ref_grads, 1e-13, zero_atol=1e-17)   # observed 4.5e-15
    print(f"float64 build: worst relative gradient error {worst:.2e}")
