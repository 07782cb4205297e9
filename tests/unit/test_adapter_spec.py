"""Bottleneck-adapter parameters in the pure stage description (compiler/model_spec.py)."""

from __future__ import annotations

import pytest

from compiler.model_spec import ModelDims, StageSpec, stage_params, trainable_params
from edgert.errors import ConfigError

DIMS = ModelDims(vocab=10, hidden=8, layers=2, heads=2, ffn=16, max_pos=8, type_vocab=2, eps=1e-12,
                 hidden_dropout=0.1, attn_dropout=0.1, num_labels=2)


def test_adapter_tensors_per_layer_and_site():
    spec = StageSpec(0, 2, 0, 1, 2, 4, adapter_size=3)
    plain = dict(stage_params(StageSpec(0, 2, 0, 1, 2, 4), DIMS))
    got = dict(stage_params(spec, DIMS))
    added = {k: v for k, v in got.items() if k not in plain}
    assert added == {
        f"encoder.layer.0.{site}.adapter.{k}": shape
        for site in ("attention.output", "output")
        for k, shape in (("down.weight", (3, 8)), ("down.bias", (3,)), ("up.weight", (8, 3)),
                         ("up.bias", (8,)))}
    assert not any(".adapter." in k for k in plain)


def test_later_stage_owns_only_its_layers_adapters():
    names = [n for n, _ in stage_params(StageSpec(1, 2, 1, 2, 2, 4, adapter_size=2), DIMS)
             if ".adapter." in n]
    assert len(names) == 8 and all(n.startswith("encoder.layer.1.") for n in names)


@pytest.mark.parametrize("kw, msg", [
    ({"adapter_size": -1}, "adapter_size must be >= 1"),
    ({"adapter_size": 4, "lora_rank": 2, "lora_alpha": 4.0}, "combined with LoRA"),
    ({"adapter_size": 4, "ffn_learners": 3}, "combined with FAR"),
])
def test_bad_adapter_specs_are_config_errors(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        StageSpec(0, 1, 0, 2, 2, 4, **kw)


def test_frozen_adapter_names_are_known_params():
    spec = StageSpec(0, 1, 0, 2, 2, 4, adapter_size=2,
                     frozen=("encoder.layer.0.output.adapter.up.bias",))
    assert "encoder.layer.0.output.adapter.up.bias" not in dict(trainable_params(spec, DIMS))
