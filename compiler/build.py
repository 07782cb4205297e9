"""Compile stages into bundles: IRModule -> tvm.compile -> export_library + params + manifest.

Compiled libraries are cached by a key over everything that determines the code (stage spec, model
dims, target, kernel configs, compiler sources, TVM version), so re-running a job or re-deploying
after training reuses them; only the parameter file changes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from compiler.arch import Arch
from compiler.compile_cache import cache_dir, compiler_hash, target_record
from compiler.model_spec import ModelDims, StageSpec, stage_params
from compiler.quant_layout import bundle_params
from edgert.artifact import (
    ACCUMULATE, LIB_FILE, MANIFEST_FILE, OPTIMIZER_STEP, PARAMS_FILE, STAGE_BACKWARD, STAGE_FORWARD,
    STAGE_LOSS, Manifest, sha256_file,
)
from edgert.contract import ACTIVATION, SPLIT_LIB, TensorMeta
from edgert.errors import ArtifactError, ModelError

log = logging.getLogger(__name__)

def _relax_pipeline(arch: Arch):
    """CPU kernels arrive scheduled: TVM's "default" pipeline only lowers them.

    GPU kernels arrive unscheduled: dlight's GPU rules bind them to OpenCL work-groups. This is TVM's
    generic GPU pipeline *without* FuseOps/FuseTIR: our kernels are already fused by construction, and
    TVM 0.27's FuseTIR fails on reshape views feeding a call_tir ("Inconsistent buffers ... mapped to the
    same relax var").
    """
    if arch.is_cpu:
        return "default"
    import tvm
    from tvm import relax
    from tvm.relax.backend.gpu_generic import pipeline as gp
    from tvm.s_tir import dlight as dl

    target = arch.tvm_target()

    @tvm.transform.module_pass(opt_level=0, name="EdgeGpuPipeline")
    def _pipeline(mod, _ctx):
        with target:
            seq = tvm.transform.Sequential([
                relax.transform.LegalizeOps(),
                dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(),
                                        dl.gpu.GeneralReduction(), dl.gpu.Fallback()),
                *gp.dataflow_lower_passes(target), *gp.finalize_passes(target)])
            return seq(mod)

    return _pipeline


def prune(mod):
    """Drop the calls whose results nothing reads (TVM's build pipeline has no dead-code pass).

    The stage graphs emit every gradient kernel of a layer and return only the trained ones
    ([Note: frozen params] in compiler/stage.py): with LoRA or adapters the frozen dense weights'
    gradient GEMMs are dead, with frozen embeddings layer 0's input gradient is. Removing them here
    keeps the graph builders simple and the frozen work out of the step."""
    from tvm import relax

    return relax.transform.DeadCodeElimination()(mod)


def compile_stage(dims: ModelDims, spec: StageSpec, arch: Arch, *, dtype: str = "float32",
                  configs: dict | None = None, use_cache: bool = True,
                  head_split: bool = False) -> tuple[Path, dict]:
    """Compile one stage's library; returns (path to the .so in the cache, build info).
    head_split: attention through the board's split executor (compiler/head_split.py)."""
    import tvm

    key = {"dims": asdict(dims), "spec": asdict(spec), "target": target_record(arch),
           "dtype": dtype, "configs": configs or {}, "compiler": compiler_hash(),
           "tvm": tvm.__version__}
    if head_split:   # absent otherwise: unsplit stages keep their cache keys
        key["head_split"] = True
    key_src = json.dumps(key, sort_keys=True)
    key = hashlib.sha256(key_src.encode()).hexdigest()[:24]
    out = cache_dir() / "libs" / key
    lib, info_path = out / LIB_FILE, out / "build.json"
    if use_cache and lib.is_file() and info_path.is_file():
        return lib, json.loads(info_path.read_text())
    t0 = time.perf_counter()
    g = _graph(dims, spec, arch, dtype, configs, head_split)
    mod = prune(g.build(optimizer=True))
    t1 = time.perf_counter()
    ex = tvm.compile(mod, target=arch.tvm_target(), relax_pipeline=_relax_pipeline(arch))
    t2 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (LIB_FILE + ".tmp.so")
    if arch.cross_cc:
        ex.export_library(str(tmp), cc=arch.cross_cc)
    else:
        ex.export_library(str(tmp))
    os.replace(tmp, lib)
    t3 = time.perf_counter()
    info = {"saved": [[n, [int(x) for x in t.shape.values] if hasattr(t.shape, "values") else
                       [int(x) for x in t.shape], str(t.dtype)] for n, t in
                      zip(g.saved_names, g._saved_types, strict=True)],
            "kernels": len(g.E.kernels), "kernel_keys": g.E.kernels,
            "seconds": {"graph": t1 - t0, "compile": t2 - t1, "export": t3 - t2}}
    info_path.write_text(json.dumps(info))
    log.info("stage %d compiled: %d kernels, %.1fs build + %.1fs export", spec.index,
             info["kernels"], t2 - t0, t3 - t2)
    return lib, info


def _is_decoder(dims) -> bool:
    from compiler.llama import LlamaConfig

    return isinstance(dims, LlamaConfig)


def _graph(dims, spec, arch: Arch, dtype: str, configs: dict | None, head_split: bool = False):
    """The stage graph for `dims`: a BERT `ModelDims` or a LLaMA-style `LlamaConfig`."""
    if head_split and (_is_decoder(dims) or not arch.is_cpu):
        raise ModelError("head split is implemented for BERT stages on CPU targets only; "
                         "compile without head_split")
    if head_split:
        from compiler.stage import StageGraph

        return StageGraph(dims, spec, arch, dtype, configs, head_split=True)
    if _is_decoder(dims):
        from compiler.decoder_stage import DecoderStageGraph

        return DecoderStageGraph(dims, spec, arch, dtype, configs)
    from compiler.stage import StageGraph

    return StageGraph(dims, spec, arch, dtype, configs)


def _stage_io(dims, spec, dtype: str) -> tuple[list, list, list[TensorMeta], list[TensorMeta]]:
    """(param names+shapes, data inputs, leading outputs) of a BERT or decoder stage."""
    if _is_decoder(dims):
        from compiler.llama import stage_io
        from compiler.llama import stage_params as dec_params

        data, outs = stage_io(dims, spec, dtype)
        return (dec_params(dims, spec), [TensorMeta(*t) for t in data],
                [TensorMeta(*t) for t in outs])
    B, T, D = spec.batch, spec.seq, dims.hidden
    data = []
    if spec.has_embeddings:
        data += [TensorMeta("input_ids", (B, T), "int64"), TensorMeta("token_type_ids", (B, T), "int64")]
    else:
        data.append(TensorMeta(ACTIVATION, (B * T, D), dtype))
    data.append(TensorMeta("attention_mask", (B, T), "int64"))
    if spec.has_head:
        data.append(TensorMeta("labels", (B,), "int64"))
    outs = ([TensorMeta("loss", (1,), dtype), TensorMeta("logits", (B, dims.num_labels), dtype)]
            if spec.has_head else [TensorMeta(ACTIVATION, (B * T, D), dtype)])
    return stage_params(spec, dims), data, outs


def write_bundle(out_dir: Path, *, lib: Path, info: dict, dims: ModelDims, spec: StageSpec, arch: Arch,
                 params: dict[str, np.ndarray], model_id: str, checkpoint_sha256: str,
                 dtype: str = "float32", split_lib: Path | None = None) -> Manifest:
    """Assemble a bundle directory (see edgert/artifact.py) from a compiled library and parameters
    (and the head-split kernel library of a stage compiled with head_split)."""
    import tvm
    from safetensors.numpy import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names, data, outs = _stage_io(dims, spec, dtype)
    missing = [n for n, _ in names if n not in params]
    if missing:
        raise ModelError(f"stage {spec.index} needs parameters the model does not have: {missing[:4]}")
    # frozen weights as GGUF blocks when spec.base_dtype asks (See [Note: quantized frozen weights])
    arrays, metas, quantized = bundle_params(spec, dims, names, params, dtype)
    (out_dir / MANIFEST_FILE).unlink(missing_ok=True)   # a half-written bundle never looks valid
    # a new file, never an overwrite: a process that has the old library loaded (dlopen maps the
    # file) would crash in its next symbol lookup if the mapped inode were rewritten
    shutil.copyfile(lib, out_dir / (LIB_FILE + ".tmp"))
    os.replace(out_dir / (LIB_FILE + ".tmp"), out_dir / LIB_FILE)
    (out_dir / SPLIT_LIB).unlink(missing_ok=True)
    extra = {}
    if split_lib is not None:
        shutil.copyfile(split_lib, out_dir / SPLIT_LIB)
        extra[SPLIT_LIB] = sha256_file(out_dir / SPLIT_LIB)
    save_file(arrays, str(out_dir / PARAMS_FILE))
    m = Manifest(
        model_id=model_id, checkpoint_sha256=checkpoint_sha256, dims=asdict(dims), stage=asdict(spec),
        target=target_record(arch), tvm_version=tvm.__version__, compiler_hash=compiler_hash(),
        dtype=dtype, data_inputs=tuple(data), outputs=tuple(outs),
        saved=tuple(TensorMeta(n, tuple(s), d) for n, s, d in info["saved"]),
        params=tuple(TensorMeta(n, tuple(s), d) for n, s, d in metas), quantized=quantized,
        entries=(STAGE_FORWARD, STAGE_BACKWARD, OPTIMIZER_STEP, ACCUMULATE,
                 *([STAGE_LOSS] if spec.has_embeddings and spec.has_head else [])),
        files={LIB_FILE: sha256_file(out_dir / LIB_FILE), PARAMS_FILE: sha256_file(out_dir / PARAMS_FILE),
               **extra},
        kernels=int(info["kernels"]), compile_seconds=float(sum(info["seconds"].values())),
    )
    (out_dir / MANIFEST_FILE).write_text(m.to_json(), encoding="utf-8")
    return m


def build_bundle(out_dir: Path, dims: ModelDims, spec: StageSpec, arch: Arch,
                 params: dict[str, np.ndarray], model_id: str, checkpoint_sha256: str, *,
                 dtype: str = "float32", configs: dict | None = None,
                 head_split: bool = False) -> Manifest:
    """Compile (or reuse) a stage's library and write its bundle. head_split: the stage's
    attention runs on the board's two backends (docs/head_split.md); the bundle then also holds
    the head-subset kernel library."""
    try:
        lib, info = compile_stage(dims, spec, arch, dtype=dtype, configs=configs,
                                  head_split=head_split)
    except ArtifactError:
        raise
    split_lib = None
    if head_split:
        from compiler.head_split import compile_split_library, stage_attn_shape

        p = dims.attn_dropout if spec.dropout else 0.0
        split_lib, _ = compile_split_library(stage_attn_shape(dims, spec, dtype), p, arch)
    return write_bundle(out_dir, lib=lib, info=info, dims=dims, spec=spec, arch=arch, params=params,
                        model_id=model_id, checkpoint_sha256=checkpoint_sha256, dtype=dtype,
                        split_lib=split_lib)
