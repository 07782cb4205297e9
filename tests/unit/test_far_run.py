"""FAR in runs, the pure parts: the run.toml `[far]` table and FAR checkpoints (plan in meta.json,
dense weights on load, the stored FAR layout on request), through control.far.FarMode."""

from __future__ import annotations

import numpy as np
import pytest

from compiler.far import reconfigure, select
from control import checkpoint as ckpt
from control.far import FarConfig, FarMode, far_moments, plan_of
from control.run_config import RunConfig
from edgert.errors import ConfigError

F, D = 96, 4


def test_far_table_in_run_toml(tmp_path):
    p = tmp_path / "run.toml"
    p.write_text('steps = 20\n[far]\nretention = 0.4\npriming = 0.1\nselection = "random"\n'
                 'freeze_embeddings = true\n')
    cfg = RunConfig.from_toml(p)
    assert (cfg.far_retention, cfg.far_priming, cfg.far_selection) == (0.4, 0.1, "random")
    assert cfg.far_freeze_embeddings is True and not RunConfig().far_freeze_embeddings
    assert RunConfig.from_dict(cfg.to_dict()) == cfg           # config.json: flat keys
    assert RunConfig().far_retention == 0                       # off by default
    for body, msg in [("[far]\nretention = 1.5\n", "far retention must be in"),
                      ("[far]\nretentoin = 0.4\n", "unknown keys .'retentoin'. in .far."),
                      ('[far]\nretention = 0.4\nselection = "top"\n', "'l1' or 'random'"),
                      ("far = 0.4\n", "far must be a table"),
                      ("[far]\nretention = 0.4\nfreeze_embeddings = 1\n", "true or false")]:
        p.write_text(body)
        with pytest.raises(ConfigError, match=msg):
            RunConfig.from_toml(p)


def _dense(rng) -> dict[str, np.ndarray]:
    pre = "encoder.layer.0."
    return {pre + "intermediate.dense.weight": rng.standard_normal((F, D)).astype(np.float32),
            pre + "intermediate.dense.bias": rng.standard_normal(F).astype(np.float32),
            pre + "output.dense.weight": rng.standard_normal((D, F)).astype(np.float32),
            pre + "output.dense.bias": rng.standard_normal(D).astype(np.float32)}


def test_far_checkpoint_records_plan_and_loads_dense(tmp_path):
    rng = np.random.default_rng(0)
    dense = _dense(rng)
    plan = select({0: rng.random(F)}, 48)
    run = FarMode(FarConfig(), None, 10, lambda split, out: [])
    assert run.checkpoint_meta() == {} and run.to_deployed(dense) is dense     # before the switch
    run.plan = plan
    far_w = run.to_deployed(dense)
    assert run.to_deployed(far_w).keys() == far_w.keys()        # idempotent
    trained = [k for k in far_w if ".frozen." not in k]
    opt = {k: v for k, v in far_moments({f"{m}/{n}": rng.random(t.shape).astype(np.float32)
                                         for m in "mv" for n, t in dense.items()}, plan).items()
           if k.split("/", 1)[1] in trained}
    meta = run.checkpoint_meta()
    assert plan_of(meta) == plan and plan_of({}) is None
    ckpt.write(tmp_path, 3, [sorted(far_w)], far_w, opt, meta)
    c = ckpt.latest(tmp_path)
    params, moments = c.load()
    assert sorted(params) == sorted(dense)
    for k, v in dense.items():
        np.testing.assert_array_equal(params[k], v)           # exact: a permutation and a split
    raw, raw_m = c.load(dense=False)
    assert sorted(raw) == sorted(reconfigure(dense, plan)) and raw_m.keys() == moments.keys()
    assert not any(".frozen." in k for k in moments)
