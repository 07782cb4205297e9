"""On-board tuning: the database survives interruptions, wrong candidates are rejected, the compiler
uses the database's configs, and tuned builds compute the same loss and gradients as untuned ones.

Small shapes (B=2, T=16; one encoder layer for the compiled stages) and short timings keep the file
well under a minute.
"""

from __future__ import annotations

import dataclasses
import functools
import json

import numpy as np
import pytest

from compiler import kernel_tuning as tuning
from compiler.arch import get_arch
from compiler.kernels import attention, gemm
from compiler.model_spec import stage_specs
from compiler.stage import StageGraph
from control.job import compile_bundles, load_model
from control.local import LocalPipeline
from edgert.errors import ConfigError

B, T = 2, 16


@pytest.fixture(scope="module")
def arch():
    return get_arch("host")


@pytest.fixture(scope="module")
def model1(minilm_dir):
    """MiniLM's weights with one encoder layer: the same kernels, a third of the compile time."""
    m = load_model(minilm_dir, num_labels=2, head_seed=0)
    return dataclasses.replace(m, dims=dataclasses.replace(m.dims, layers=1))


@pytest.fixture
def fast(arch):
    return tuning.Measurer(arch, min_seconds=0.005, min_runs=2)


def _workload(builder, args, kw) -> tuning.Workload:
    key = tuning.workload_key(builder, args, kw)
    return tuning.Workload(key, builder, args, kw, keys=[key])


def _canon(cfg) -> str:
    return json.dumps(cfg, sort_keys=True)


def test_db_round_trip_and_resume(tmp_path, arch, fast):
    wl = _workload(gemm.build_gemm, (16, 16, 32), {"trans_b": True, "bias": True})
    n = len(wl.candidates(arch))
    assert n >= 6
    path = tmp_path / "board.json"
    first = []

    def ctrl_c_after_4(ev):
        first.append(ev)
        if len(first) == 4:
            raise KeyboardInterrupt      # what Ctrl-C does in the middle of a run

    rep = tuning.tune(None, [], arch, tuning.TuningDB(path), 60, ctrl_c_after_4, wls=[wl],
                      measurer=fast)
    assert rep.interrupted
    rec = tuning.TuningDB(path).matching(arch)[0]          # from disk
    assert rec["workload"] == wl.key and rec["keys"] == [wl.key] and rec["pending"] is None
    assert [c["config"] for c in rec["candidates"]] == [e.config for e in first]
    assert rec["candidates"][0]["default"] and rec["candidates"][0]["status"] == "ok"
    assert not rec["complete"]

    second = []
    tuning.tune(None, [], arch, tuning.TuningDB(path), 60, second.append, wls=[wl], measurer=fast)
    again = {_canon(e.config) for e in second if e.candidate}
    assert not again & {_canon(e.config) for e in first}, "recorded candidates were re-measured"
    rec = tuning.TuningDB(path).matching(arch)[0]
    assert rec["complete"] and len(rec["candidates"]) == n

    third = []      # nothing left to measure; a zero budget measures nothing either
    tuning.tune(None, [], arch, tuning.TuningDB(path), 0, third.append, wls=[wl], measurer=fast)
    assert not [e for e in third if e.candidate]


def test_crash_inside_a_candidate_is_recorded_and_skipped(tmp_path, arch, fast):
    wl = _workload(gemm.build_gemm, (8, 32, 16), {})
    path = tmp_path / "board.json"
    db = tuning.TuningDB(path)
    cand = wl.candidates(arch)[1]
    db.record(arch, wl)["pending"] = cand                  # as left by a process that died
    db.save()
    tuning.tune(None, [], arch, tuning.TuningDB(path), 0, None, wls=[wl], measurer=fast)
    rec = tuning.TuningDB(path).matching(arch)[0]
    assert rec["pending"] is None
    assert [c["status"] for c in rec["candidates"] if c["config"] == cand] == ["crashed"]


def test_wrong_and_unbuildable_candidates_are_rejected(tmp_path, arch, fast):
    args, kw = (16, 16, 32), {"trans_b": True, "bias": True}
    cands = _workload(gemm.build_gemm, args, kw).candidates(arch)
    wrong, broken = _canon(cands[1]), _canon(cands[2])

    @functools.wraps(gemm.build_gemm)       # same module and name: the same workload key and space
    def faulty_gemm(*a, config=None, **k):
        if config is not None and _canon(config) == wrong:
            k = {**k, "epilogue": "gelu"}   # compiles and runs, computes something else
        if config is not None and _canon(config) == broken:
            raise RuntimeError("this tile does not schedule")
        return gemm.build_gemm(*a, config=config, **k)

    wl = _workload(faulty_gemm, args, kw)
    db = tuning.TuningDB(tmp_path / "board.json")
    events = []
    tuning.tune(None, [], arch, db, 60, events.append, wls=[wl], measurer=fast)
    rec = db.matching(arch)[0]
    status = {_canon(c["config"]): c for c in rec["candidates"]}
    assert status[wrong]["status"] == "wrong" and status[wrong]["ms"] is None   # never timed
    assert "max |diff|" in status[wrong]["error"]
    assert status[broken]["status"] == "build_error"
    assert "does not schedule" in status[broken]["error"]
    assert {c["status"] for k, c in status.items() if k not in (wrong, broken)} <= {"ok", "same"}
    assert rec["complete"] and _canon(tuning.best(rec)["config"]) not in (wrong, broken)
    assert all(_canon(c) not in (wrong, broken) for c in tuning.configs_for(db, arch).values())
    assert [e.status for e in events][:3] == ["ok", "wrong", "build_error"]


def test_records_of_other_targets_and_versions_are_ignored(tmp_path, arch):
    wl = _workload(gemm.build_gemm, (8, 32, 16), {})
    db = tuning.TuningDB(tmp_path / "board.json")
    db.pin(arch, wl, {"mr": 4, "nr": 1, "nc": 1, "pack_b": False})
    db.save()
    pinned = {"mr": 4, "nr": 1, "nc": 1, "pack_b": False}
    assert tuning.configs_for(tuning.TuningDB(db.path), arch) == {wl.key: pinned}
    assert tuning.configs_for(db, dataclasses.replace(arch, threads=arch.threads + 1)) == {}
    for field, stale in (("tvm", "0.0.0"), ("source", "edited"), ("schema", 0)):
        db = tuning.TuningDB(db.path)
        db.records[0][field] = stale
        assert tuning.configs_for(db, arch) == {}, field
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="unreadable"):
        tuning.TuningDB(tmp_path / "bad.json")
    with pytest.raises(ConfigError, match="edgert tune"):
        tuning.board_configs(arch, tmp_path / "missing.json")


def test_choice_needs_an_interleaved_confirmation():
    """Only a re-timing next to the default decides; a min-of-N from a quiet moment does not."""
    a, b, d = {"mr": 4}, {"mr": 8}, {"mr": 12}
    rec = {"candidates": [{"config": d, "status": "ok", "ms": 10.0, "default": True},
                          {"config": a, "status": "ok", "ms": 6.0},
                          {"config": b, "status": "wrong", "ms": None},
                          {"config": b, "status": "ok", "ms": 7.0}]}
    assert [c["config"] for c in tuning.finalists(rec)] == [a, b]
    tuning.decide(rec)
    assert rec["choice"] is None and not tuning.confirmed(rec)       # nothing confirmed yet
    rec["confirm"] = {"measured": 4, "default_ms": 9.0,
                      "candidates": [{"config": a, "ms": 7.9, "ratio": 0.99},
                                     {"config": b, "ms": 8.0, "ratio": 0.9}]}
    tuning.decide(rec)      # b: faster than the default round by round (a: only its best round)
    assert tuning.confirmed(rec) and rec["choice"]["config"] == b and rec["choice"]["ms"] == 8.0
    rec["confirm"]["candidates"][1]["ratio"] = 0.96                  # < 5% faster: the default
    tuning.decide(rec)
    assert rec["choice"] is None
    rec["candidates"].append({"config": {"mr": 2}, "status": "ok", "ms": 5.0})
    assert not tuning.confirmed(rec)                                 # a new candidate: re-confirm


def _pin_non_defaults(db, arch, wls):
    """A non-default config for every tunable kernel (the middle of its candidate list)."""
    for w in wls:
        cands = w.candidates(arch)
        db.pin(arch, w, cands[len(cands) // 2])
    db.save()


def test_stage_workloads_group_layers_and_cover_the_tunable_kernels(minilm_dir, arch):
    full = load_model(minilm_dir)
    wls = tuning.workloads(full, stage_specs([(0, 3), (3, 6)], B, T), arch)
    att = [w for w in wls if w.builder is attention.build_attention_fwd]
    assert len(att) == 1 and att[0].calls == 6 and len(att[0].keys) == 6   # one per layer's salt
    assert att[0].n_out == 2 and len(att[0].candidates(arch)) > 1
    assert {w.builder.__name__ for w in wls} == {"build_gemm", "build_attention_fwd",
                                                 "build_attention_bwd"}
    assert wls == sorted(wls, key=lambda w: -w.weight)


def test_tuned_build_uses_db_configs_and_keeps_the_numerics(model1, arch, real_batch, tmp_path,
                                                            monkeypatch):
    monkeypatch.setenv("EDGERT_CACHE", str(tmp_path / "cache"))   # the "board's" default DB
    specs = stage_specs([(0, 1)], B, T)
    wls = tuning.workloads(model1, specs, arch)
    db = tuning.TuningDB(tuning.default_db_path())
    _pin_non_defaults(db, arch, wls)
    configs = tuning.board_configs(arch)
    assert set(configs) == {k for w in wls for k in w.keys}

    seen = {}                                  # the workload key's config reaches the builder

    def spy(builder):
        @functools.wraps(builder)
        def f(*a, config=None, **k):
            shape_kw = {x: v for x, v in k.items() if x not in ("dtype", "arch")}
            seen[tuning.workload_key(builder, a, shape_kw)] = config
            return builder(*a, config=config, **k)
        return f

    with monkeypatch.context() as mp:
        for mod, name in ((gemm, "build_gemm"), (attention, "build_attention_fwd"),
                          (attention, "build_attention_bwd")):
            mp.setattr(mod, name, spy(getattr(mod, name)))
        StageGraph(model1.dims, specs[0], arch, configs=configs).build(optimizer=False)
    for w in wls:
        assert seen[w.key] == configs[w.keys[0]], w.label

    batch = real_batch(B, T)
    runs = {}
    for name, kw in (("untuned", {"configs": {}}), ("tuned", {})):   # {} = --no-tuning
        paths = compile_bundles(model1, tmp_path / name, stages=1, batch=B, seq=T, progress=False,
                                **kw)
        runs[name] = (json.loads((paths[0] / "manifest.json").read_text())["files"],
                      LocalPipeline(paths).grads(batch))
    (f0, (l0, g0)), (f1, (l1, g1)) = runs["untuned"], runs["tuned"]
    assert f0 != f1, "the tuned configs did not change the compiled library"
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    for name, ref in g0[0].items():
        np.testing.assert_allclose(g1[0][name], ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max(),
                                   err_msg=name)


def test_cli_tune_short_budget(tmp_path, capsys):
    from control.cli import main

    db = tmp_path / "board.json"
    rc = main(["tune", "--stages", "1", "--batch", "2", "--seq", "8", "--budget", "4",
               "--db", str(db)])
    out = capsys.readouterr()
    assert rc == 0 and db.is_file()
    assert "speedup" in out.out and "estimated gain" in out.out
    assert "cand  1/" in out.err
