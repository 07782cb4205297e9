"""FAR's pure parts: node scores, learner selection, the weight layout both ways, the stage spec."""

from __future__ import annotations

import numpy as np
import pytest

from compiler.far import FarPlan, far_spec, learner_count, node_scores, reconfigure, restore, select
from compiler.model_spec import FAR_SPLIT, ModelDims, StageSpec, stage_params, trainable_params
from control.far import FarConfig
from edgert.errors import ConfigError

D, F = 4, 6
DIMS = ModelDims(vocab=10, hidden=D, layers=2, heads=2, ffn=F, max_pos=8, type_vocab=2, eps=1e-12,
                 hidden_dropout=0.1, attn_dropout=0.1, num_labels=2)


def _ffn(rng, layers=(0, 1)):
    w = {}
    for li in layers:
        pre = f"encoder.layer.{li}."
        w[pre + "intermediate.dense.weight"] = rng.standard_normal((F, D)).astype(np.float32)
        w[pre + "intermediate.dense.bias"] = rng.standard_normal(F).astype(np.float32)
        w[pre + "output.dense.weight"] = rng.standard_normal((D, F)).astype(np.float32)
        w[pre + "output.dense.bias"] = rng.standard_normal(D).astype(np.float32)
    return w


def test_scores_are_the_l1_change_of_each_node_and_selection_keeps_the_top():
    rng = np.random.default_rng(0)
    before = _ffn(rng)
    after = {k: v.copy() for k, v in before.items()}
    pre = "encoder.layer.0."
    # Node 4 moves by 3 in its input row, node 1 by 2 in its output column, node 2 by 1 in its
    # bias; the output bias (not a node's) changes a lot and must not count.
    after[pre + "intermediate.dense.weight"][4] += np.array([1, -1, 0.5, -0.5], np.float32)
    after[pre + "output.dense.weight"][:, 1] -= 0.5
    after[pre + "intermediate.dense.bias"][2] += 1
    after[pre + "output.dense.bias"] += 100
    s = node_scores(before, after, [0, 1])
    np.testing.assert_allclose(s[0], [0, 2, 1, 0, 3, 0], atol=1e-6)
    assert not s[1].any()
    plan = select(s, 2, "l1")
    assert plan.learner_nodes(0) == (1, 4)            # top two, in node order
    assert plan.perms[0] == (1, 4, 0, 2, 3, 5)
    assert plan.learner_nodes(1) == (0, 1)            # all tied: the lowest indices


def test_random_selection_is_seeded_and_differs_from_l1():
    s = {0: np.arange(100.0), 1: np.arange(100.0)}
    a, b = select(s, 40, "random", seed=1), select(s, 40, "random", seed=1)
    assert a == b and a != select(s, 40, "random", seed=2)
    assert a.perms[0] != a.perms[1]                   # a separate draw per layer
    assert select(s, 40, "l1").learner_nodes(0) == tuple(range(60, 100))


def test_reconfigure_splits_contiguously_and_restore_is_exact():
    rng = np.random.default_rng(1)
    w = _ffn(rng)
    plan = select({0: rng.random(F), 1: rng.random(F)}, 2, "l1")
    far = reconfigure(w, plan)
    pre = "encoder.layer.0."
    nodes = list(plan.learner_nodes(0))
    np.testing.assert_array_equal(far[pre + "intermediate.learner.weight"],
                                  w[pre + "intermediate.dense.weight"][nodes])
    np.testing.assert_array_equal(far[pre + "output.learner.weight"],
                                  w[pre + "output.dense.weight"][:, nodes])
    assert far[pre + "output.frozen.weight"].shape == (D, F - 2)
    assert far[pre + "output.frozen.weight"].flags.c_contiguous
    assert pre + "intermediate.dense.weight" not in far
    back = restore(far, plan)
    assert back.keys() == w.keys()
    assert all(np.array_equal(back[k], w[k]) for k in w)
    # The FFN computes the same function in either layout (numpy, float64).
    x = rng.standard_normal((3, D))

    def dense(p, W):
        return np.tanh(x @ W[p + "intermediate.dense.weight"].T.astype(np.float64)
                       + W[p + "intermediate.dense.bias"]) @ W[p + "output.dense.weight"].T

    def split(p, W):
        return sum(np.tanh(x @ W[f"{p}intermediate.{k}.weight"].T.astype(np.float64)
                           + W[f"{p}intermediate.{k}.bias"]) @ W[f"{p}output.{k}.weight"].T
                   for k in ("learner", "frozen"))
    np.testing.assert_allclose(split(pre, far), dense(pre, w), rtol=1e-12)


def test_optimizer_state_uses_a_prefix_and_absent_layers_are_skipped():
    rng = np.random.default_rng(2)
    m = {"m/" + k: v for k, v in _ffn(rng, layers=(1,)).items()}
    plan = select({0: rng.random(F), 1: rng.random(F)}, 3, "l1")
    far = reconfigure(m, plan, prefix="m/")
    assert "m/encoder.layer.1.intermediate.learner.bias" in far
    assert restore(far, plan, prefix="m/").keys() == m.keys()


def test_far_spec_freezes_the_frozen_parts_and_renames_the_stage_params():
    plan = FarPlan(2, {0: (0, 1, 2, 3, 4, 5), 1: (5, 4, 3, 2, 1, 0)})
    spec = far_spec(StageSpec(0, 1, 0, 2, 2, 8), plan)
    names = dict(stage_params(spec, DIMS))
    assert names["encoder.layer.1.intermediate.learner.weight"] == (2, D)
    assert names["encoder.layer.1.output.frozen.weight"] == (D, F - 2)
    assert "encoder.layer.1.output.dense.bias" in names
    assert not any(".dense.weight" in n and "intermediate" in n for n in names)
    tr = {n for n, _ in trainable_params(spec, DIMS)}
    frozen = {f"encoder.layer.{li}.{FAR_SPLIT[n][1]}" for li in (0, 1) for n in FAR_SPLIT}
    assert set(spec.frozen) == frozen and not tr & frozen
    assert tr | frozen == set(names)


def test_bad_far_settings_say_how_to_fix_them():
    assert learner_count(1536, 0.4) == 614 and learner_count(1536, 0.4, 16) == 608
    with pytest.raises(ConfigError, match=r"retention must be in \(0, 1\)"):
        learner_count(1536, 1.0)
    with pytest.raises(ConfigError, match="e.g. --far 0.4"):
        FarConfig(retention=40)
    with pytest.raises(ConfigError, match="'l1' or 'random'"):
        FarConfig(selection="top")
    with pytest.raises(ConfigError, match="not a permutation"):
        FarPlan(1, {0: (0, 0, 1)})
    with pytest.raises(ConfigError, match="does not own"):
        trainable_params(StageSpec(0, 1, 0, 2, 2, 8, frozen=("classifier.weight2",)), DIMS)
    with pytest.raises(ConfigError, match="ffn_learners must be in 1..5"):
        stage_params(StageSpec(0, 1, 0, 2, 2, 8, ffn_learners=6), DIMS)
    assert FarConfig(priming_fraction=0.05).priming_steps(60) == 3


def test_freeze_embeddings_goes_into_the_plan_and_only_the_embedding_stage_freezes_them(tmp_path):
    from control.far import plan_from_priming

    rng = np.random.default_rng(2)
    before = _ffn(rng)
    after = {k: v + rng.standard_normal(v.shape).astype(np.float32) for k, v in before.items()}
    plan = plan_from_priming(before, after, 2, F, FarConfig(retention=0.5, align=1,
                                                            freeze_embeddings=True))
    emb = {"embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight",
           "embeddings.token_type_embeddings.weight", "embeddings.LayerNorm.weight",
           "embeddings.LayerNorm.bias"}
    assert set(plan.freeze) == emb
    assert plan_from_priming(before, after, 2, F, FarConfig(retention=0.5, align=1)).freeze == ()
    plan.save(tmp_path / "plan.json")                      # far_plan.json / checkpoint meta
    assert FarPlan.load(tmp_path / "plan.json") == plan
    assert FarPlan.from_dict(plan.to_dict()) == plan
    first = far_spec(StageSpec(0, 2, 0, 1, 2, 8), plan)           # owns the embeddings
    last = far_spec(StageSpec(1, 2, 1, 2, 2, 8), plan)            # does not
    assert emb <= set(first.frozen) and not emb & set(last.frozen)
    assert not emb & {n for n, _ in trainable_params(first, DIMS)}
