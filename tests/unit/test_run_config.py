"""RunConfig (TOML, defaults, clear errors) and the run report's metrics (pure, no TVM)."""

from __future__ import annotations

import json

import pytest

from control.events import Event
from control.run_config import RunConfig
from control.run_report import metrics, render_html
from edgert.errors import ConfigError


def test_defaults_and_round_trip(tmp_path):
    cfg = RunConfig()
    assert cfg.mode == "sync" and cfg.boards >= 1 and cfg.budget_bytes is None
    assert cfg.warmup_steps == cfg.steps // 10
    (tmp_path / "c.json").write_text(json.dumps(cfg.to_dict()))
    assert RunConfig.from_json(tmp_path / "c.json") == cfg


def test_toml_subset_keeps_other_defaults(tmp_path):
    p = tmp_path / "run.toml"
    p.write_text('boards = 3\nsplit = "0:2,2:4,4:6"\nsteps = 8\nbudget_mib = 512\nlr = 1\n')
    cfg = RunConfig.from_toml(p)
    assert (cfg.boards, cfg.split, cfg.steps) == (3, "0:2,2:4,4:6", 8)
    assert cfg.budget_bytes == 512 << 20
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)      # TOML int accepted for a float
    assert cfg.batch == RunConfig().batch


@pytest.mark.parametrize("text, words", [
    ("stepz = 3\n", ["unknown keys", "stepz", "known keys"]),
    ("steps = 0\n", ["steps", ">= 1"]),
    ("steps = [\n", ["not valid TOML"]),
    ('mode = "async"\n', ["sync"]),
    ("stages = 2\nsplit = '0:3,3:6'\n", ["either stages or split"]),
    ("boards = 1\nstages = 2\n", ["2 stages need at least 2 boards"]),
    ("lr = -1.0\n", ["lr", "> 0"]),
])
def test_bad_config_says_how_to_fix(tmp_path, text, words):
    p = tmp_path / "bad.toml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        RunConfig.from_toml(p)
    for w in words:
        assert w in str(e.value), str(e.value)


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        RunConfig.from_toml(tmp_path / "nope.toml")


def test_metrics_keep_the_last_value_of_a_redone_step_and_render():
    evs = [Event("plan", {"ranges": [[0, 3], [3, 6]], "boards": ["b0", "b1"], "reason": "start"}),
           Event("step", {"step": 1, "loss": 0.7, "step_s": 1.0}),
           Event("step", {"step": 2, "loss": 0.9, "step_s": 1.0}),
           Event("alert", {"level": "error", "text": "board b0 lost"}),
           Event("board", {"name": "b0", "alive": False, "stage": None}),
           Event("step", {"step": 2, "loss": 0.6, "step_s": 3.0}),
           Event("eval", {"step": 2, "loss": 0.5, "accuracy": 0.75, "examples": 8}),
           Event("board", {"name": "b1", "stage": 0, "rss_mib": 100.0, "peak_rss_mib": 120.0,
                           "budget_mib": 512.0, "alive": True})]
    m = metrics(evs)
    assert [(s["step"], s["loss"]) for s in m["steps"]] == [(1, 0.7), (2, 0.6)]
    assert m["median_step_s"] == 2.0
    assert [b["name"] for b in m["boards"]] == ["b0", "b1"]
    assert m["boards"][0]["alive"] is False and m["boards"][1]["peak_rss_mib"] == 120.0
    page = render_html(m, "t")
    assert page.count("<svg") == 4 and "board b0 lost" in page and "training loss" in page


def test_run_directory_refuses_another_config_and_resume_needs_one(tmp_path):
    from control.run import Run

    run = Run(RunConfig(steps=3), tmp_path / "r")
    assert RunConfig.from_json(tmp_path / "r" / "config.json") == run.config
    assert Run(RunConfig(steps=3), tmp_path / "r").config.steps == 3     # same config: reopens
    with pytest.raises(ConfigError, match=r"another config .*'steps': \(3, 4\).*edgert resume"):
        Run(RunConfig(steps=4), tmp_path / "r")
    with pytest.raises(ConfigError, match="not a run directory"):
        Run.resume(tmp_path / "empty")
    run.pause()                      # on an instance, resume() un-pauses (no training started)
    assert not run._unpaused.is_set()
    run.resume()
    assert run._unpaused.is_set() and run.state == "created"
