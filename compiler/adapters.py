"""Bottleneck adapters (Houlsby et al. 2019) in the BERT stage graph: init, forward/backward, files.

Each encoder layer gets two adapters, one after the attention output dense and one after the FFN
output dense; each sits after that dense's dropout and before its residual add + LayerNorm (as in
Houlsby's reference code, google-research/adapter-bert):

    hd = dropout(dense(...))                      (the same hash mask as without adapters)
    a  = hd + up(gelu(down(hd)))                  down: [r, D] + bias, up: [D, r] + bias
    y  = LayerNorm(a + residual)

GELU (exact erf), because it is BERT's own nonlinearity (its kernels and their gradient epilogue
exist and are verified) and Houlsby's code uses it too. `up` starts at zero, so a fresh adapter is
the identity and the model starts *exactly* equal to the pretrained one. Backward (da = dL/da):

    dWu = da^T g    dbu = sum_rows da    du = (da Wu) * gelu'(u)      (one GEMM, fused epilogue)
    dWd = du^T hd   dbd = sum_rows du    dhd = da + du Wd             (one GEMM, fused add)
    d(dense output) = dropout(dhd)       (dropout is its own VJP with the same seed and salt)

Saved per site: hd [M, D], u = down(hd) [M, r], g = gelu(u) [M, r].

Exported adapters live in ``adapters.safetensors`` next to the Hugging Face checkpoint, named
``bert.encoder.layer.<i>.<site>.adapter.{down,up}.{weight,bias}`` (site ``attention.output`` or
``output``), with the metadata ``format = edgert-adapters/1``, ``adapter_size``, ``activation``.

    >>> from compiler.model_spec import ModelDims, StageSpec
    >>> dims = ModelDims(10, 8, 1, 2, 16, 16, 2, 1e-12, 0.1, 0.1, 2)
    >>> w = adapter_init(dims, StageSpec(0, 1, 0, 1, 2, 4, adapter_size=3), seed=0)
    >>> sorted(w)[0], bool(w["encoder.layer.0.output.adapter.up.weight"].any())
    ('encoder.layer.0.attention.output.adapter.down.bias', False)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from compiler.model_spec import ADAPTER_SITES, ModelDims, StageSpec
from edgert.errors import ConfigError, ModelError

ADAPTERS_FILE = "adapters.safetensors"
FORMAT = "edgert-adapters/1"
ACTIVATION = "gelu"
_TAG = {"attention.output": "adA", "output": "adF"}   # saved-tensor prefixes per site


def is_adapter_trainable(name: str) -> bool:
    """Houlsby's trainable set: the adapters, every LayerNorm and the classifier head."""
    return ".adapter." in name or ".LayerNorm." in name or name.startswith("classifier.")


def adapter_init(dims: ModelDims, spec: StageSpec, seed: int = 0) -> dict[str, np.ndarray]:
    """Initial adapters of the stage's layers: down ~ N(0, 1/D) (seeded per layer, so every split
    draws the same values), down bias 0, up = 0 and up bias 0 (each adapter is the identity)."""
    if spec.adapter_size < 1:
        raise ConfigError("adapter_init needs a stage with adapter_size >= 1: build it with "
                          "compiler.peft.peft_spec(spec, dims, 'adapter', adapter_size=16)")
    r, D = spec.adapter_size, dims.hidden
    out = {}
    for li in range(spec.first, spec.last):
        rng = np.random.default_rng([seed, 0xADA, li])
        for site in ADAPTER_SITES:
            pre = f"encoder.layer.{li}.{site}.adapter."
            out[pre + "down.weight"] = (rng.standard_normal((r, D)) / np.sqrt(D)).astype(np.float32)
            out[pre + "down.bias"] = np.zeros(r, np.float32)
            out[pre + "up.weight"] = np.zeros((D, r), np.float32)
            out[pre + "up.bias"] = np.zeros(D, np.float32)
    return out


# ---- graph pieces (called from compiler/stage.py) ------------------------------------------------
def forward(g, h, seed, P, site: str, salt: int):
    """dropout(h) + up(gelu(down(dropout(h)))) for one site; returns (output, saved tensors)."""
    from compiler.kernels import elementwise, gemm

    E, M, D, r = g.E, g.M, g.d.hidden, g.s.adapter_size
    pre, tag = site + ".adapter.", _TAG[site]
    if g.p_h > 0:   # the site's dropout, taken out of the LayerNorm kernel (the adapter follows it)
        (h,) = E(elementwise.build_dropout, [h, seed], M, D, p=g.p_h, salt=salt)
    (u,) = E(gemm.build_gemm, [h, P[pre + "down.weight"], P[pre + "down.bias"]], M, r, D,
             trans_b=True, bias=True)
    (a,) = E(elementwise.build_gelu, [u], M, r)
    (out,) = E(gemm.build_gemm, [a, P[pre + "up.weight"], P[pre + "up.bias"], h], M, D, r,
               trans_b=True, bias=True, epilogue="add")
    return out, {f"{tag}_in": h, f"{tag}_u": u, f"{tag}_g": a}


def backward(g, da, S, seed, P, G, site: str, salt: int):
    """The site's four adapter gradients into G; returns the gradient of the dense output."""
    from compiler.kernels import elementwise, gemm

    E, M, D, r = g.E, g.M, g.d.hidden, g.s.adapter_size
    pre, tag = site + ".adapter.", _TAG[site]
    (G[pre + "up.weight"],) = E(gemm.build_gemm, [da, S[f"{tag}_g"]], D, r, M, trans_a=True)
    (G[pre + "up.bias"],) = E(elementwise.build_bias_grad, [da], M, D)
    (du,) = E(gemm.build_gemm, [da, P[pre + "up.weight"], S[f"{tag}_u"]], M, r, D,
              epilogue="gelu_grad")
    (G[pre + "down.weight"],) = E(gemm.build_gemm, [du, S[f"{tag}_in"]], r, D, M, trans_a=True)
    (G[pre + "down.bias"],) = E(elementwise.build_bias_grad, [du], M, r)
    (dh,) = E(gemm.build_gemm, [du, P[pre + "down.weight"], da], M, D, r, epilogue="add")
    if g.p_h > 0:
        (dh,) = E(elementwise.build_dropout, [dh, seed], M, D, p=g.p_h, salt=salt)
    return dh


# ---- files ---------------------------------------------------------------------------------------
def split_adapters(weights: dict[str, np.ndarray]) -> tuple[dict, dict]:
    """(weights without adapters, adapter tensors), internal names."""
    ad = {k: v for k, v in weights.items() if ".adapter." in k}
    return {k: v for k, v in weights.items() if k not in ad}, ad


def adapter_size_of(adapters: dict[str, np.ndarray]) -> int:
    """The bottleneck size r of a set of adapter tensors (all must agree)."""
    sizes = {int(v.shape[0]) for k, v in adapters.items() if k.endswith("adapter.down.weight")}
    if len(sizes) != 1:
        raise ModelError(f"adapter tensors disagree on (or lack) the bottleneck size: "
                         f"{sorted(sizes)}")
    return sizes.pop()


def save_adapters(out_dir: str | Path, adapters: dict[str, np.ndarray]) -> Path:
    """Write ``out_dir/adapters.safetensors`` (``bert.`` prefixed names, float32, metadata)."""
    import os

    from safetensors.numpy import save_file

    r = adapter_size_of(adapters)
    path = Path(out_dir) / ADAPTERS_FILE
    tmp = path.with_name(path.name + ".tmp")
    save_file({"bert." + k: np.ascontiguousarray(v, np.float32) for k, v in adapters.items()},
              str(tmp), metadata={"format": FORMAT, "adapter_size": str(r),
                                  "activation": ACTIVATION, "placement": "houlsby"})
    os.replace(tmp, path)
    return path


def load_adapters(model_dir: str | Path) -> tuple[dict[str, np.ndarray], int]:
    """Adapters of an exported folder: (internal names -> float32 arrays, adapter size).

    Examples
    --------
    >>> model = control.job.load_model("runs/x/hf_model")  # doctest: +SKIP
    >>> ad, r = load_adapters("runs/x/hf_model")            # doctest: +SKIP
    >>> weights = {**model.weights, **ad}   # doctest: +SKIP
    >>> # then peft_spec(spec, dims, "adapter", adapter_size=r) and build_bundle(..., weights)
    """
    from safetensors import safe_open

    path = Path(model_dir) / ADAPTERS_FILE
    if not path.is_file():
        raise ModelError(f"{path}: no adapters file; export the adapter model with "
                         "compiler.export.export_hf_internal (it writes one next to the "
                         "checkpoint)")
    try:
        with safe_open(str(path), "numpy") as f:
            meta = f.metadata() or {}
            tensors = {k.removeprefix("bert."): f.get_tensor(k) for k in f.keys()}
    except Exception as e:   # safetensors raises several types for a corrupt file
        raise ModelError(f"{path}: not a readable safetensors file ({e}); export it again") from e
    if meta.get("format") != FORMAT or meta.get("activation") != ACTIVATION:
        raise ModelError(f"{path}: format {meta.get('format')!r} / activation "
                         f"{meta.get('activation')!r}, expected {FORMAT!r} / {ACTIVATION!r}")
    r = adapter_size_of(tensors)
    if str(r) != meta.get("adapter_size"):
        raise ModelError(f"{path}: tensors have adapter size {r}, metadata says "
                         f"{meta.get('adapter_size')}; the file is inconsistent, export it again")
    return {k: np.asarray(v, np.float32) for k, v in tensors.items()}, r

