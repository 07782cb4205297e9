"""Stages whose frozen weights are GGUF blocks (``base_dtype`` q8_0 / q4_1; docs/quant.md).

The trainable set's gradients of a quantized-base stage must equal an independent float64
reference that uses the *dequantized* weights (the values the kernels compute with), to the same
1e-4 relative bound as the float32 stages (||g - g_ref|| / ||g_ref||); K = 2 must equal K = 1
(1e-5). Real weights: MiniLM cut to 2 layers (LoRA on Q8_0, BitFit on Q4_1, weights quantized at
compile time) and SmolLM2-135M-Instruct cut to 3 layers (LoRA on the GGUF file's own Q4_1 / Q8_0
blocks, kept byte for byte). Real batches (Rotten Tomatoes, movie dialog), 2 x 16 tokens.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from compiler import quant as Q
from compiler import quant_layout as QL
from compiler.arch import get_arch
from compiler.build import build_bundle
from compiler.model_spec import split_qkv, stage_specs
from compiler.peft import lora_init, merge_lora, peft_spec
from control.job import load_model
from control.local import LocalPipeline
from edgert.artifact import load_manifest
from tests import reference_bert as ref

pytestmark = pytest.mark.slow
B, T, L = 2, 16, 2
RANK, ALPHA = 4, 8.0
HOST = get_arch("host")


def _rel(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


def _stored(bundles) -> dict[str, np.ndarray]:
    """The bundles' parameters as the kernels see them: quantized tensors dequantized."""
    from safetensors.numpy import load_file

    out = {}
    for d in bundles:
        m = load_manifest(d)
        for name, a in load_file(str(d / "params.safetensors")).items():
            q = m.quantized.get(name)
            out[name] = Q.dequantize(a, q["format"], tuple(q["shape"])) if q else a
    return out


# ---- MiniLM (BERT) ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bert(minilm_dir):
    m = load_model(minilm_dir, num_labels=2, head_seed=0)
    m = dataclasses.replace(m, dims=dataclasses.replace(m.dims, layers=L))
    keep = {k: v for k, v in m.weights.items()
            if not k.startswith("encoder.layer.") or int(k.split(".")[2]) < L}
    return dataclasses.replace(m, weights=keep)


def _bert_bundles(bert, root, name, split, method, base, weights, **kw):
    specs = [dataclasses.replace(peft_spec(s, bert.dims, method, **kw), base_dtype=base)
             for s in stage_specs(split, B, T)]
    out = []
    for s in specs:
        d = root / name / f"stage{s.index}"
        build_bundle(d, bert.dims, s, HOST, weights, bert.model_id, bert.sha256, configs={})
        out.append(d)
    return out


@pytest.fixture(scope="module")
def bert_lora(bert, build_root):
    """LoRA on a Q8_0 base with non-zero B factors (from zero, dA would be exactly zero)."""
    (spec,) = stage_specs([(0, L)], B, T)
    spec = peft_spec(spec, bert.dims, "lora", rank=RANK, alpha=ALPHA)
    w = {**bert.weights, **lora_init(bert.dims, spec, seed=1)}
    rng = np.random.default_rng(2)
    for k, v in w.items():
        if k.endswith("lora_B"):
            w[k] = (0.05 * rng.standard_normal(v.shape)).astype(np.float32)
    k1 = _bert_bundles(bert, build_root, "q8_lora_k1", [(0, L)], "lora", "q8_0", w, rank=RANK,
                       alpha=ALPHA)
    k2 = _bert_bundles(bert, build_root, "q8_lora_k2", [(0, 1), (1, L)], "lora", "q8_0", w,
                       rank=RANK, alpha=ALPHA)
    return k1, k2, w


def test_bert_bundle_holds_blocks_and_reports_error(bert, bert_lora):
    k1, _, w = bert_lora
    m = load_manifest(k1[0])
    dense = [f"encoder.layer.{i}.{n}" for i in range(L) for n in (
        "attention.self.qkv.weight", "attention.output.dense.weight",
        "intermediate.dense.weight", "output.dense.weight")]
    want = {**{n: "q8_0" for n in dense}, "pooler.dense.weight": "q8_0",
            "embeddings.word_embeddings.weight": "q8_0"}
    assert {n: q["format"] for n, q in m.quantized.items()} == want
    metas = {t.name: t for t in m.params}
    for n, q in m.quantized.items():
        assert metas[n].dtype == "uint8"
        assert metas[n].shape == Q.stored_shape(tuple(q["shape"]), "q8_0")
        assert 1e-3 < q["rel_error"] < 1e-2, (n, q["rel_error"])   # Q8_0 on real weights
        assert q["rel_error"] == pytest.approx(Q.rel_error(w[n], Q.quantize(w[n], "q8_0"), "q8_0"))
    others = [t for t in m.params if t.name not in m.quantized]
    assert others and all(t.dtype == "float32" for t in others)   # norms, biases, LoRA, head
    q_bytes = sum(metas[n].nbytes for n in m.quantized)
    f_bytes = sum(4 * int(np.prod(q["shape"])) for q in m.quantized.values())
    assert q_bytes / f_bytes == pytest.approx(34 / 128)


def test_bert_lora_q8_0_gradients_match_float64_reference(bert, bert_lora, real_batch):
    """dA, dB vs the chain rule on the reference's gradient of the merged *dequantized* weight."""
    k1, _, w = bert_lora
    s = ALPHA / RANK
    batch = real_batch(B, T, offset=24)
    loss, (grads,) = LocalPipeline(k1).grads(batch)
    wq = {**w, **{k: v for k, v in _stored(k1).items() if k in load_manifest(k1[0]).quantized}}
    assert not np.array_equal(wq["pooler.dense.weight"], w["pooler.dense.weight"])
    ref_loss, rg = ref.loss_and_grads(split_qkv(merge_lora(wq, s)), batch, config=bert.config)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    errs = {}
    for li in range(L):
        pre = f"encoder.layer.{li}.attention.self."
        G = np.concatenate([rg[f"{pre}{q}.weight"] for q in ("query", "key", "value")])
        a, b = w[pre + "qkv.lora_A"].astype(np.float64), w[pre + "qkv.lora_B"].astype(np.float64)
        errs[pre + "qkv.lora_B"] = _rel(grads[pre + "qkv.lora_B"], s * G @ a.T)
        errs[pre + "qkv.lora_A"] = _rel(grads[pre + "qkv.lora_A"], s * b.T @ G)
    for k in ("classifier.weight", "classifier.bias"):
        errs[k] = _rel(grads[k], rg[k])
    worst = max(errs, key=errs.get)
    print(f"\nBERT LoRA on Q8_0: loss {loss:.6f} (ref {ref_loss:.6f}); worst gradient {worst} "
          f"{errs[worst]:.1e}")
    assert errs[worst] < 1e-4, (worst, errs[worst])


def test_bert_forward_only_entry_equals_forward(bert_lora, real_batch):
    """`stage_loss` (what forward-gradient clients call) runs the same quantized kernels."""
    from control.local import stage_inputs
    from edgert.runtime import to_np

    k1, _, _ = bert_lora
    pipe = LocalPipeline(k1)
    batch = real_batch(B, T, offset=56)
    loss, logits = pipe.predict(batch)
    st = pipe.stages[0]
    l2, lg2 = st.loss(stage_inputs(st, batch, None))
    assert float(to_np(l2)[0]) == loss
    assert np.array_equal(to_np(lg2), logits)


def test_bert_lora_q8_0_k2_equals_k1(bert_lora, real_batch):
    k1, k2, _ = bert_lora
    batch = real_batch(B, T, offset=40)
    l1, (g1,) = LocalPipeline(k1).grads(batch)
    l2, g2 = LocalPipeline(k2).grads(batch)
    g2 = {k: v for part in g2 for k, v in part.items()}
    assert g1.keys() == g2.keys()
    assert l2 == pytest.approx(l1, rel=1e-6)
    worst = max(_rel(g2[k], g1[k]) for k in g1)
    print(f"\nK=2 vs K=1: worst relative gradient difference {worst:.1e}")
    assert worst < 1e-5


def test_bert_bitfit_q4_1_gradients_match_float64_reference(bert, build_root, real_batch):
    bundles = _bert_bundles(bert, build_root, "q41_bitfit", [(0, L)], "bitfit", "q4_1",
                            bert.weights)
    m = load_manifest(bundles[0])
    assert {q["format"] for q in m.quantized.values()} == {"q4_1", "q8_0"}   # embeddings Q8_0
    assert all(0.03 < q["rel_error"] < 0.15 for n, q in m.quantized.items()
               if q["format"] == "q4_1")
    batch = real_batch(B, T, offset=8)
    loss, (grads,) = LocalPipeline(bundles).grads(batch)
    wq = {**bert.weights, **{k: v for k, v in _stored(bundles).items() if k in m.quantized}}
    ref_loss, rg = ref.loss_and_grads(split_qkv(wq), batch, config=bert.config)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    ours = split_qkv(grads)
    top = max(np.linalg.norm(rg[k]) for k in ours)
    errs = {}
    for k, g in ours.items():
        if np.linalg.norm(rg[k]) < 1e-7 * top:     # key bias: exactly zero true gradient
            assert np.linalg.norm(g) <= 1e-6 * top, k
        else:
            errs[k] = _rel(g, rg[k])
    worst = max(errs, key=errs.get)
    print(f"\nBERT BitFit on Q4_1: {len(errs)} tensors, worst {worst} {errs[worst]:.1e}")
    assert errs[worst] < 1e-4, (worst, errs[worst])


# ---- SmolLM2 (LLaMA) on the GGUF file's own blocks ---------------------------------------------
N_LAYERS = 3


@pytest.fixture(scope="module")
def smol():
    from compiler.gguf import load_gguf, load_gguf_blocks
    from tests.reference_llama import movie_dialog_batch, truncate

    ck = load_gguf_blocks()
    cfg, blocks = truncate(ck.config, ck.params, N_LAYERS)
    _, floats = truncate(ck.config, load_gguf().params, N_LAYERS)
    batch = movie_dialog_batch(ck.tokenizer_file, B, T)
    return cfg, blocks, floats, batch


def _dec_bundles(cfg, params, root, name, split):
    from compiler.llama import DecoderSpec, stage_arrays, stage_params
    from compiler.peft import decoder_lora_spec

    out = []
    for i, (a, b) in enumerate(split):
        spec = decoder_lora_spec(cfg, DecoderSpec(a, b, N_LAYERS, B, T, index=i,
                                                  num_stages=len(split)), rank=RANK, alpha=ALPHA)
        spec = QL.with_base_dtype(spec, "q4_1")
        arrays = dict(zip((n for n, _ in stage_params(cfg, spec)),
                          stage_arrays(cfg, spec, params), strict=True))
        d = root / name / f"stage{i}"
        build_bundle(d, cfg, spec, HOST, arrays, "smollm2-q4_1", "test")
        out.append(d)
    return out


@pytest.fixture(scope="module")
def smol_lora(smol, build_root):
    from compiler.llama import LORA_B, DecoderSpec
    from compiler.peft import decoder_lora_init

    cfg, blocks, _, _ = smol
    lora = decoder_lora_init(cfg, DecoderSpec(0, N_LAYERS, N_LAYERS, B, T, lora_rank=RANK),
                             seed=1)
    rng = np.random.default_rng(2)
    for k in lora:
        if k.endswith(LORA_B):
            lora[k] = (0.05 * rng.standard_normal(lora[k].shape)).astype(np.float32)
    k1 = _dec_bundles(cfg, {**blocks, **lora}, build_root, "smol_q41_k1", [(0, N_LAYERS)])
    k2 = _dec_bundles(cfg, {**blocks, **lora}, build_root, "smol_q41_k2", [(0, 2), (2, N_LAYERS)])
    return k1, k2, lora


def test_smollm2_blocks_are_the_files_own(smol, smol_lora):
    from safetensors.numpy import load_file

    _, blocks, floats, _ = smol
    k1, _, _ = smol_lora
    m = load_manifest(k1[0])
    fmts = {n: q["format"] for n, q in m.quantized.items()}
    assert fmts["model.embed_tokens.weight"] == "q8_0"   # the file's token_embd (and tied head)
    assert {f for n, f in fmts.items() if n.startswith("model.layers.")} == {"q4_1"}
    assert len(fmts) == 1 + 4 * N_LAYERS
    assert all(q["rel_error"] == 0.0 for q in m.quantized.values())   # no re-quantization
    stored = load_file(str(k1[0] / "params.safetensors"))
    pre = "model.layers.1."
    want = np.concatenate([blocks[pre + f"self_attn.{x}_proj.weight"].blocks for x in "qkv"])
    assert np.array_equal(stored[pre + "self_attn.qkv_proj.weight"], want)
    assert np.array_equal(stored["model.embed_tokens.weight"],
                          blocks["model.embed_tokens.weight"].blocks)
    # the blocks decode to exactly load_gguf's float32 weights (q/k rows un-permuted on blocks)
    for n in (pre + "self_attn.q_proj.weight", pre + "self_attn.k_proj.weight",
              pre + "mlp.down_proj.weight", "model.embed_tokens.weight"):
        assert np.array_equal(blocks[n].dequantize(), floats[n]), n


def test_smollm2_lora_q4_1_gradients_match_float64_reference(smol, smol_lora):
    """LoRA dA, dB from a Q4_1-base stage vs the chain rule on the float64 reference's gradient
    of the merged weight, the reference using the dequantized weights (= load_gguf's)."""
    from compiler.llama import LORA_A, LORA_B
    from compiler.peft import merge_decoder_lora
    from tests.reference_llama import LlamaRef

    cfg, _, floats, batch = smol
    k1, _, lora = smol_lora
    s = ALPHA / RANK
    loss, (grads,) = LocalPipeline(k1).grads(batch)
    merged = merge_decoder_lora(cfg, {**floats, **lora}, s)
    ref_loss, rg = LlamaRef(cfg, merged).grads(batch["input_ids"], batch["labels"],
                                               batch["attention_mask"])
    assert abs(loss - ref_loss) <= 1e-4 * abs(ref_loss), (loss, ref_loss)
    errs = {}
    for li in range(N_LAYERS):
        pre = f"model.layers.{li}."
        G = np.concatenate([rg[pre + f"self_attn.{x}_proj.weight"] for x in "qkv"])
        a = lora[pre + LORA_A].astype(np.float64)
        b = lora[pre + LORA_B].astype(np.float64)
        errs[pre + LORA_B] = _rel(grads[pre + LORA_B], s * G @ a.T)
        errs[pre + LORA_A] = _rel(grads[pre + LORA_A], s * b.T @ G)
    assert set(grads) == set(errs)
    worst = max(errs, key=errs.get)
    print(f"\nSmolLM2 LoRA on Q4_1: loss {loss:.6f} (ref {ref_loss:.6f}); worst {worst} "
          f"{errs[worst]:.1e}")
    assert errs[worst] < 1e-4, (worst, errs[worst])


def test_smollm2_lora_q4_1_k2_equals_k1(smol, smol_lora):
    _, _, _, batch = smol
    k1, k2, _ = smol_lora
    l1, (g1,) = LocalPipeline(k1).grads(batch)
    l2, g2 = LocalPipeline(k2).grads(batch)
    g2 = {k: v for part in g2 for k, v in part.items()}
    assert g1.keys() == g2.keys()
    assert l2 == pytest.approx(l1, rel=1e-6)
    worst = max(_rel(g2[k], g1[k]) for k in g1)
    print(f"\nSmolLM2 K=2 vs K=1: worst relative gradient difference {worst:.1e}")
    assert worst < 1e-5


# ---- arm64: the quantized stage cross-compiled, run by the emulated board's runtime -------------
def test_bert_lora_q8_0_arm64_stage_under_qemu(bert, bert_lora, build_root, real_batch):
    """The LoRA-on-Q8_0 stage built for arm64 (NEON) and run under qemu-aarch64 with TVM's aarch64
    runtime gives the x86 bundle's loss and gradients (1e-5 relative: FMA contraction and NEON
    reduction order differ)."""
    import shutil
    import subprocess

    from compiler import build_inspect as ci
    from control.boards import arm64_rootfs, qemu_command

    arm = get_arch("arm64", threads=1)
    if not shutil.which(arm.cross_cc) or shutil.which("qemu-aarch64-static") is None:
        pytest.skip("needs the aarch64 cross toolchain and qemu-user-static (scripts/setup.sh)")
    k1, _, w = bert_lora
    (spec,) = stage_specs([(0, L)], B, T)
    spec = QL.with_base_dtype(peft_spec(spec, bert.dims, "lora", rank=RANK, alpha=ALPHA), "q8_0")
    d = build_root / "q8_lora_arm64" / "stage0"
    build_bundle(d, bert.dims, spec, arm, w, bert.model_id, bert.sha256, configs={})
    assert ci.elf_header(d / "stage.so")["machine"] == ci.EM_AARCH64
    objdump = ci.find_objdump("aarch64")
    if objdump is not None:   # the quantized GEMMs' micro-kernels are NEON FMAs
        vec = ci.count_instructions(ci.disassemble(d / "stage.so", objdump), r"^fmla\tv\d+\.4s")
        q = {s: n for s, n in vec.items() if "_qgemm" in s}
        assert q and all(n >= 4 for n in q.values()), q
    batch = real_batch(B, T, offset=24)
    np.savez(build_root / "q8_lora_arm64" / "batch.npz", **batch)
    out = build_root / "q8_lora_arm64" / "out.npz"
    cmd = qemu_command(arm64_rootfs(), ["python", "-m", "tests.kernel_runner", "--stage", str(d),
                                        str(build_root / "q8_lora_arm64" / "batch.npz"),
                                        str(out)])
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    got = np.load(out)
    loss, (grads,) = LocalPipeline(k1).grads(batch)
    assert float(got["loss"][0]) == pytest.approx(loss, rel=1e-5)
    worst = max(_rel(got[f"grad/{k}"], g) for k, g in grads.items())
    print(f"\narm64 (qemu) vs x86 quantized stage: loss {float(got['loss'][0]):.6f} vs "
          f"{loss:.6f}, worst gradient difference {worst:.1e}")
    assert worst < 1e-5


# ---- OpenCL: a quantized stage builds with every kernel on the GPU -------------------------------
def test_quantized_stage_builds_for_opencl(bert):
    """The LoRA-on-Q4_1 first stage (quantized embedding gather + GEMMs) through the Mali
    pipeline: every one of our kernels, the quantized ones included, becomes an OpenCL kernel
    (none left on the host). Their numerics on PoCL: tests/integration/test_kernels_qgemm.py."""
    from compiler import build_inspect as ci
    from compiler.stage import StageGraph

    arch = get_arch("mali")
    spec = QL.with_base_dtype(peft_spec(stage_specs([(0, 1), (1, L)], B, T)[0], bert.dims, "lora"),
                             "q4_1")
    g = StageGraph(bert.dims, spec, arch)
    b = ci.compile_with_schedule(g.build(), arch)
    src = ci.opencl_sources(b.ex)
    kernels = ci.gpu_kernels(b.scheduled, src)
    ours = {g.E._gv[k].name_hint: k for k in g.E.kernels}
    quantized = [n for n, k in ours.items() if k.startswith(("qgemm.", "qembed."))]
    assert len(quantized) >= 5, quantized            # embedding + forward / data-gradient GEMMs
    assert not [n for n in ours if n not in kernels], "kernels left on the host"
