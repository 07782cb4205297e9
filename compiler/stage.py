"""Relax graph of one pipeline stage: forward, backward, optimizer and gradient accumulation.

Every op is a call into a kernel of `compiler/kernels/` (scheduled by us for CPUs, by dlight for GPUs).
The backward is written out op by op (each op's VJP is a kernel checked against finite differences in
tests/integration/test_kernels_*.py), and the forward *saves* the activations the backward needs
instead of recomputing them, as a training framework does: Relax's `Gradient` pass recomputes the whole
forward inside the backward (+33% FLOPs) and emits unfused transposes (see docs/compiler.md).

Entry points (names fixed in `edgert.artifact`):

  stage_forward(*data, seed, *params)            -> (out, *saved)        out = hidden [B*T, D]
                                                  -> (loss, logits, *saved) on the last stage
  stage_backward(*saved, dout, seed, *params)    -> (dhidden, *grads)    no dhidden on the first stage
                                                    (dout is the loss scale [1] on the last stage)
  optimizer_step(*params, *grads, *m, *v, hyper) -> params, m, v updated in place (AdamW)
  grad_accumulate(*acc, *grads)                  -> acc += grads, in place

data = (input_ids, token_type_ids) on the first stage, else (hidden,); then attention_mask; then
labels on the last stage. Dropout masks come from a counter hash of (seed, site, index): the same seed
given to forward and backward reproduces them (see compiler/kernels/common.py).

[Note: frozen params] `*params` of forward/backward are all the stage's parameters
(model_spec.stage_params); those named in `StageSpec.frozen` are inputs only: the backward returns
gradients for the trainable ones (model_spec.trainable_params) alone, and optimizer_step /
grad_accumulate take only those. The bundle manifest's `stage["frozen"]` carries the set to the board.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import tvm
from tvm import relax

from compiler.arch import Arch
from compiler import far_ffn, head_split
from compiler import peft
from compiler import adapters, qstage
from compiler.kernels import attention, elementwise, embed, gemm, inplace, loss, norm, optim
from compiler.model_spec import ModelDims, StageSpec, stage_params, trainable_params
from edgert.artifact import ACCUMULATE, OPTIMIZER_STEP, STAGE_BACKWARD, STAGE_FORWARD, STAGE_LOSS
from edgert.contract import ACTIVATION, HYPER, SEED_DTYPE, SEED_SHAPE


def _tt(shape, dtype="float32"):
    return relax.TensorType([int(s) for s in shape], dtype)


@dataclass
class Emitter:
    """Adds each distinct kernel to the module once and emits `call_tir`s to it."""

    bb: relax.BlockBuilder
    arch: Arch
    dtype: str
    configs: dict[str, dict] = field(default_factory=dict)  # tuned schedule knobs by workload key
    _gv: dict[str, relax.GlobalVar] = field(default_factory=dict)
    _fn: dict[str, tvm.tirx.PrimFunc] = field(default_factory=dict)
    kernels: list[str] = field(default_factory=list)

    def kernel(self, builder, *args, **kw):
        key = builder.__module__.rsplit(".", 1)[-1] + "." + builder.__name__ + repr((args, sorted(kw.items())))
        if key not in self._gv:
            cfg = self.configs.get(key)
            extra = {"config": cfg} if cfg is not None else {}
            f = builder(*args, dtype=self.dtype, arch=self.arch, **kw, **extra)
            if "global_symbol" in (f.attrs or {}):
                f = f.without_attr("global_symbol")   # the module names it (one "main" per builder)
            name = f"k{len(self._gv)}_{builder.__name__.removeprefix('build_')}"
            self._gv[key] = self.bb.add_func(f, name)
            self._fn[key] = f
            self.kernels.append(key)
        return key

    def call(self, key: str, args: list, n_out: int = 1) -> list[relax.Expr]:
        f = self._fn[key]
        # TVM 0.27: PrimFunc params carry their buffer's shape and dtype directly.
        outs = [_tt(b.shape, str(b.dtype)) for b in f.params[len(f.params) - n_out:]]
        v = self.bb.emit(relax.call_tir(self._gv[key], args, outs if n_out > 1 else outs[0]))
        if n_out == 1:
            return [v]
        return [self.bb.emit(relax.TupleGetItem(v, i)) for i in range(n_out)]

    def __call__(self, builder, args: list, *bargs, n_out: int = 1, **kw) -> list[relax.Expr]:
        # quantized operands go to the quantized kernels (See [Note: quantized frozen weights])
        builder, args, bargs, kw = qstage.route(self, builder, args, bargs, kw)
        return self.call(self.kernel(builder, *bargs, **kw), args, n_out)

    def inplace(self, builder, args: list, idx: list[int], *bargs, **kw) -> list[relax.Expr]:
        key = self.kernel(builder, *bargs, **kw)
        outs = [args[i].ty for i in idx]
        v = self.bb.emit(relax.call_tir_inplace(self._gv[key], args, idx, outs if len(idx) > 1 else outs[0]))
        if len(idx) == 1:
            return [v]
        return [self.bb.emit(relax.TupleGetItem(v, i)) for i in range(len(idx))]


def _salt(layer: int, site: int) -> int:
    """A distinct dropout stream per site: layers 0.., embeddings -1, head -2."""
    return (layer + 2) * 8 + site


class StageGraph:
    """Builds the IRModule of one stage (see the module docstring for the entry points)."""

    def __init__(self, dims: ModelDims, spec: StageSpec, arch: Arch, dtype: str = "float32",
                 configs: dict[str, dict] | None = None, head_split: bool = False):
        self.d, self.s, self.arch, self.dtype = dims, spec, arch, dtype
        self.head_split = head_split   # attention on the board's backends (compiler/head_split.py)
        self.M = spec.batch * spec.seq
        self.p_h = dims.hidden_dropout if spec.dropout else 0.0
        self.p_a = dims.attn_dropout if spec.dropout else 0.0
        # Adapters sit between a dense's dropout and its LayerNorm: they apply the dropout
        # themselves and the LayerNorm kernel then takes none (compiler/adapters.py).
        self.p_ln = 0.0 if spec.adapter_size else self.p_h
        self.params = stage_params(spec, dims)
        self.trainable = trainable_params(spec, dims)   # See [Note: frozen params]
        self.stored = qstage.stored_types(spec, dims)    # quantized ones: uint8 GGUF blocks
        self.bb = relax.BlockBuilder()
        self.E = Emitter(self.bb, arch, dtype, configs or {})
        self.saved_names: list[str] = []

    # ---- inputs ---------------------------------------------------------------------------
    def data_vars(self) -> list[relax.Var]:
        s, d, B, T = self.s, self.d, self.s.batch, self.s.seq
        vs = []
        if s.has_embeddings:
            vs += [relax.Var("input_ids", _tt((B, T), "int64")),
                   relax.Var("token_type_ids", _tt((B, T), "int64"))]
        else:
            vs.append(relax.Var(ACTIVATION, _tt((B * T, d.hidden), self.dtype)))
        vs.append(relax.Var("attention_mask", _tt((B, T), "int64")))
        if s.has_head:
            vs.append(relax.Var("labels", _tt((B,), "int64")))
        return vs

    def param_vars(self, prefix: str = "", which=None) -> list[relax.Var]:
        st = self.stored
        return [relax.Var(prefix + n.replace(".", "_"), _tt(*st.get(n, (shape, self.dtype))))
                for n, shape in (self.params if which is None else which)]

    # ---- forward --------------------------------------------------------------------------
    def _layer_fwd(self, x, maskf, seed, P, li):
        E, d, M, dt = self.E, self.d, self.M, self.dtype
        B, T, D, F = self.s.batch, self.s.seq, d.hidden, d.ffn
        (qkv,) = E(gemm.build_gemm, [x, P["attention.self.qkv.weight"], P["attention.self.qkv.bias"]],
                   M, 3 * D, D, trans_b=True, bias=True)
        lora_saved = {}
        if self.s.lora_rank:      # LoRA on the fused QKV (compiler/peft.py)
            qkv, lora_saved = peft.lora_forward(self, x, qkv, P)
        if self.head_split:
            ctx, probs = head_split.emit_fwd(self, qkv, maskf, seed, li, _salt(li, 0))
        else:
            ctx, probs = E(attention.build_attention_fwd, [qkv, maskf, seed], B, T, d.heads,
                           d.head_dim, n_out=2, dropout=self.p_a, salt=_salt(li, 0))
        (proj,) = E(gemm.build_gemm, [ctx, P["attention.output.dense.weight"],
                                      P["attention.output.dense.bias"]], M, D, D, trans_b=True, bias=True)
        ad_saved = {}
        if self.s.adapter_size:   # bottleneck adapter after attention output (compiler/adapters.py)
            proj, ad_saved = adapters.forward(self, proj, seed, P, "attention.output", _salt(li, 1))
        h1, xhat1, rstd1 = E(norm.build_layernorm_fwd,
                             [proj, x, P["attention.output.LayerNorm.weight"],
                              P["attention.output.LayerNorm.bias"], seed],
                             M, D, n_out=3, eps=d.eps, residual=True, dropout=self.p_ln, salt=_salt(li, 1))
        if self.s.ffn_learners:   # FAR: learner + frozen sublayers (compiler/far_ffn.py)
            z, ffn_saved = far_ffn.forward(self, h1, P)
        else:
            (u,) = E(gemm.build_gemm, [h1, P["intermediate.dense.weight"], P["intermediate.dense.bias"]],
                     M, F, D, trans_b=True, bias=True)
            (g,) = E(elementwise.build_gelu, [u], M, F)
            (z,) = E(gemm.build_gemm, [g, P["output.dense.weight"], P["output.dense.bias"]],
                     M, D, F, trans_b=True, bias=True)
            ffn_saved = dict(u=u, g=g)
        if self.s.adapter_size:   # bottleneck adapter after the FFN output
            z, ad2 = adapters.forward(self, z, seed, P, "output", _salt(li, 2))
            ad_saved.update(ad2)
        h2, xhat2, rstd2 = E(norm.build_layernorm_fwd,
                             [z, h1, P["output.LayerNorm.weight"], P["output.LayerNorm.bias"], seed],
                             M, D, n_out=3, eps=d.eps, residual=True, dropout=self.p_ln, salt=_salt(li, 2))
        del dt
        saved = dict(x=x, qkv=qkv, probs=probs, ctx=ctx, xhat1=xhat1, rstd1=rstd1, h1=h1, **ffn_saved,
                     xhat2=xhat2, rstd2=rstd2, **lora_saved, **ad_saved)
        return h2, saved

    def _embed_fwd(self, ids, tt, seed, P):
        E, d, M = self.E, self.d, self.M
        B, T, D = self.s.batch, self.s.seq, d.hidden
        (s,) = E(embed.build_embed_fwd, [ids, tt, P["embeddings.word_embeddings.weight"],
                                         P["embeddings.position_embeddings.weight"],
                                         P["embeddings.token_type_embeddings.weight"]],
                 B, T, d.vocab, D, d.max_pos, d.type_vocab)
        y, xhat, rstd = E(norm.build_layernorm_fwd, [s, P["embeddings.LayerNorm.weight"],
                                                     P["embeddings.LayerNorm.bias"], seed],
                          M, D, n_out=3, eps=d.eps, residual=False, dropout=0.0, salt=0)
        if self.p_h > 0:
            (y,) = E(elementwise.build_dropout, [y, seed], M, D, p=self.p_h, salt=_salt(-1, 0))
        return y, dict(ids=ids, tt=tt, xhat=xhat, rstd=rstd)

    def _head_fwd(self, h, labels, seed, P):
        E, d = self.E, self.d
        B, T, D, C = self.s.batch, self.s.seq, d.hidden, d.num_labels
        (cls,) = E(elementwise.build_take_rows, [h], B, T, D)
        (pre,) = E(gemm.build_gemm, [cls, P["pooler.dense.weight"], P["pooler.dense.bias"]],
                   B, D, D, trans_b=True, bias=True)
        (pooled,) = E(elementwise.build_tanh_fwd, [pre], B, D)
        pooled_d = pooled
        if self.p_h > 0:
            (pooled_d,) = E(elementwise.build_dropout, [pooled, seed], B, D, p=self.p_h, salt=_salt(-2, 0))
        (logits,) = E(gemm.build_gemm, [pooled_d, P["classifier.weight"], P["classifier.bias"]],
                      B, C, D, trans_b=True, bias=True)
        lossv, probs = E(loss.build_xent_fwd, [logits, labels], B, C, n_out=2)
        return lossv, logits, dict(cls=cls, pooled=pooled, pooled_d=pooled_d, probs=probs, labels=labels)

    def build_forward(self, name: str = STAGE_FORWARD):
        """stage_forward; or, as STAGE_LOSS, the forward-only stage_loss(*data, *params) ->
        (loss, logits): dropout off (a constant seed with flag 0, the same kernels) and no saved
        activations, so the VM's memory planner reuses their buffers (docs/fwdgrad.md)."""
        bb, s = self.bb, self.s
        only = name == STAGE_LOSS
        data = self.data_vars()
        seed = relax.Var("seed", _tt(SEED_SHAPE, SEED_DTYPE))
        pv = self.param_vars()
        P = {n: v for (n, _), v in zip(self.params, pv, strict=True)}
        with bb.function(name, [*data, *pv] if only else [*data, seed, *pv]):
            with bb.dataflow():
                if only:   # flag 0: every dropout kernel is the identity
                    seed = relax.const([1, 0], "int64")
                it = iter(data)
                if s.has_embeddings:
                    ids, tt = next(it), next(it)
                else:
                    h = next(it)
                mask = next(it)
                labels = next(it) if s.has_head else None
                maskf = bb.emit(relax.op.astype(mask, self.dtype))
                saved: list[tuple[str, relax.Expr]] = [("maskf", maskf)]
                if s.has_embeddings:
                    h, sv = self._embed_fwd(ids, tt, seed, {k: v for k, v in P.items()})
                    saved += [(f"emb.{k}", v) for k, v in sv.items()]
                for li in range(s.first, s.last):
                    pre = f"encoder.layer.{li}."
                    LP = {k[len(pre):]: v for k, v in P.items() if k.startswith(pre)}
                    h, sv = self._layer_fwd(h, maskf, seed, LP, li)
                    saved += [(f"layer{li}.{k}", v) for k, v in sv.items()]
                if s.has_head:
                    lossv, logits, sv = self._head_fwd(h, labels, seed, P)
                    saved += [(f"head.{k}", v) for k, v in sv.items()]
                    outs = [lossv, logits]
                else:
                    outs = [h]
                if only:
                    saved = []
                else:
                    self.saved_names = [n for n, _ in saved]
                o = bb.emit_output(relax.Tuple(outs + [v for _, v in saved]))
            bb.emit_func_output(o)
        if not only:
            self._saved_types = [v.ty for _, v in saved]

    # ---- backward -------------------------------------------------------------------------
    def _layer_bwd(self, dh2, S, seed, P, G, li):
        E, d, M = self.E, self.d, self.M
        B, T, D, F = self.s.batch, self.s.seq, d.hidden, d.ffn
        o = E(norm.build_layernorm_bwd, [dh2, S["xhat2"], S["rstd2"], P["output.LayerNorm.weight"], seed],
              M, D, n_out=4 if self.p_ln > 0 else 3, dropout=self.p_ln, salt=_salt(li, 2))
        ds2, G["output.LayerNorm.weight"], G["output.LayerNorm.bias"] = o[:3]
        dz = o[3] if self.p_ln > 0 else ds2
        if self.s.adapter_size:   # adapter gradients; dz becomes the FFN output's gradient
            dz = adapters.backward(self, dz, S, seed, P, G, "output", _salt(li, 2))
        (G["output.dense.bias"],) = E(elementwise.build_bias_grad, [dz], M, D)
        if self.s.ffn_learners:   # FAR: weight gradients of the learner part only
            dh1 = far_ffn.backward(self, dz, ds2, S, P, G)
        else:
            (G["output.dense.weight"],) = E(gemm.build_gemm, [dz, S["g"]], D, F, M, trans_a=True)
            (du,) = E(gemm.build_gemm, [dz, P["output.dense.weight"], S["u"]], M, F, D,
                      epilogue="gelu_grad")
            (G["intermediate.dense.weight"],) = E(gemm.build_gemm, [du, S["h1"]], F, D, M, trans_a=True)
            (G["intermediate.dense.bias"],) = E(elementwise.build_bias_grad, [du], M, F)
            (dh1,) = E(gemm.build_gemm, [du, P["intermediate.dense.weight"], ds2], M, D, F,
                       epilogue="add")
        o = E(norm.build_layernorm_bwd, [dh1, S["xhat1"], S["rstd1"],
                                         P["attention.output.LayerNorm.weight"], seed],
              M, D, n_out=4 if self.p_ln > 0 else 3, dropout=self.p_ln, salt=_salt(li, 1))
        ds1, G["attention.output.LayerNorm.weight"], G["attention.output.LayerNorm.bias"] = o[:3]
        dproj = o[3] if self.p_ln > 0 else ds1
        if self.s.adapter_size:
            dproj = adapters.backward(self, dproj, S, seed, P, G, "attention.output", _salt(li, 1))
        (G["attention.output.dense.weight"],) = E(gemm.build_gemm, [dproj, S["ctx"]], D, D, M, trans_a=True)
        (G["attention.output.dense.bias"],) = E(elementwise.build_bias_grad, [dproj], M, D)
        (dctx,) = E(gemm.build_gemm, [dproj, P["attention.output.dense.weight"]], M, D, D)
        if self.head_split:
            (dqkv,) = head_split.emit_bwd(self, S["qkv"], S["probs"], dctx, seed, li, _salt(li, 0))
        else:
            (dqkv,) = E(attention.build_attention_bwd, [S["qkv"], S["probs"], dctx, seed],
                        B, T, d.heads, d.head_dim, dropout=self.p_a, salt=_salt(li, 0))
        (G["attention.self.qkv.weight"],) = E(gemm.build_gemm, [dqkv, S["x"]], 3 * D, D, M, trans_a=True)
        (G["attention.self.qkv.bias"],) = E(elementwise.build_bias_grad, [dqkv], M, 3 * D)
        (dx,) = E(gemm.build_gemm, [dqkv, P["attention.self.qkv.weight"], ds1], M, D, 3 * D, epilogue="add")
        if self.s.lora_rank:      # LoRA factor gradients + input-gradient path (compiler/peft.py)
            dx = peft.lora_backward(self, dqkv, dx, S, P, G)
        return dx

    def _embed_bwd(self, dy, S, seed, P, G):
        E, d, M = self.E, self.d, self.M
        B, T, D = self.s.batch, self.s.seq, d.hidden
        tables = {"word": "embeddings.word_embeddings.weight",
                  "pos": "embeddings.position_embeddings.weight",
                  "type": "embeddings.token_type_embeddings.weight"}
        trained = {n for n, _ in self.trainable}
        want = tuple(k for k, n in tables.items() if n in trained)   # frozen tables: not computed
        if not want and not trained & {"embeddings.LayerNorm.weight", "embeddings.LayerNorm.bias"}:
            return      # all of the embeddings frozen: nothing below the first layer to compute
        if self.p_h > 0:
            (dy,) = E(elementwise.build_dropout, [dy, seed], M, D, p=self.p_h, salt=_salt(-1, 0))
        ds, G["embeddings.LayerNorm.weight"], G["embeddings.LayerNorm.bias"] = E(
            norm.build_layernorm_bwd, [dy, S["xhat"], S["rstd"], P["embeddings.LayerNorm.weight"], seed],
            M, D, n_out=3, dropout=0.0, salt=0)
        if want:
            outs = E(embed.build_embed_bwd, [S["ids"], S["tt"], ds], B, T, d.vocab, D, d.max_pos,
                     d.type_vocab, n_out=len(want), grads=want)
            G.update({tables[k]: g for k, g in zip(want, outs, strict=True)})

    def _head_bwd(self, scale, S, seed, P, G):
        E, d = self.E, self.d
        B, T, D, C = self.s.batch, self.s.seq, d.hidden, d.num_labels
        (dlogits,) = E(loss.build_xent_bwd, [S["probs"], S["labels"], scale], B, C)
        (G["classifier.weight"],) = E(gemm.build_gemm, [dlogits, S["pooled_d"]], C, D, B, trans_a=True)
        (G["classifier.bias"],) = E(elementwise.build_bias_grad, [dlogits], B, C)
        (dpooled,) = E(gemm.build_gemm, [dlogits, P["classifier.weight"]], B, D, C)
        if self.p_h > 0:
            (dpooled,) = E(elementwise.build_dropout, [dpooled, seed], B, D, p=self.p_h, salt=_salt(-2, 0))
        (dpre,) = E(elementwise.build_tanh_bwd, [dpooled, S["pooled"]], B, D)
        (G["pooler.dense.weight"],) = E(gemm.build_gemm, [dpre, S["cls"]], D, D, B, trans_a=True)
        (G["pooler.dense.bias"],) = E(elementwise.build_bias_grad, [dpre], B, D)
        (dcls,) = E(gemm.build_gemm, [dpre, P["pooler.dense.weight"]], B, D, D)
        (dh,) = E(elementwise.build_scatter_rows_bwd, [dcls], B, T, D)
        return dh

    def build_backward(self):
        bb, s, d = self.bb, self.s, self.d
        saved_vars = [relax.Var("s_" + n.replace(".", "_"), t)
                      for n, t in zip(self.saved_names, self._saved_types, strict=True)]
        if s.has_head:
            dout = relax.Var("loss_scale", _tt((1,), self.dtype))
        else:
            dout = relax.Var("dhidden", _tt((self.M, d.hidden), self.dtype))
        seed = relax.Var("seed", _tt(SEED_SHAPE, SEED_DTYPE))
        pv = self.param_vars()
        P = {n: v for (n, _), v in zip(self.params, pv, strict=True)}
        SV = dict(zip(self.saved_names, saved_vars, strict=True))
        G: dict[str, relax.Expr] = {}
        with bb.function(STAGE_BACKWARD, [*saved_vars, dout, seed, *pv]):
            with bb.dataflow():
                if s.has_head:
                    S = {k[5:]: v for k, v in SV.items() if k.startswith("head.")}
                    dh = self._head_bwd(dout, S, seed, P, G)
                else:
                    dh = dout
                for li in reversed(range(s.first, s.last)):
                    pre = f"encoder.layer.{li}."
                    LP = {k[len(pre):]: v for k, v in P.items() if k.startswith(pre)}
                    LG: dict[str, relax.Expr] = {}
                    S = {k.split(".", 1)[1]: v for k, v in SV.items() if k.startswith(f"layer{li}.")}
                    dh = self._layer_bwd(dh, S, seed, LP, LG, li)
                    G.update({pre + k: v for k, v in LG.items()})
                if s.has_embeddings:
                    S = {k[4:]: v for k, v in SV.items() if k.startswith("emb.")}
                    self._embed_bwd(dh, S, seed, P, G)
                grads = [G[n] for n, _ in self.trainable]   # See [Note: frozen params]
                outs = grads if s.has_embeddings else [dh, *grads]
                o = bb.emit_output(relax.Tuple(outs))
            bb.emit_func_output(o)

    # ---- optimizer ------------------------------------------------------------------------
    def _flat(self, v, n):
        return self.bb.emit(relax.op.reshape(v, (n,)))

    def build_optimizer(self):
        bb, E = self.bb, self.E
        tr = self.trainable   # See [Note: frozen params]
        params, grads = self.param_vars("p_", tr), self.param_vars("g_", tr)
        ms, vs = self.param_vars("m_", tr), self.param_vars("v_", tr)
        hyper = relax.Var("hyper", _tt((len(HYPER),), self.dtype))
        with bb.function(OPTIMIZER_STEP, [*params, *grads, *ms, *vs, hyper]):
            with bb.dataflow():
                outs = []
                for (_, shape), p, g, m, v in zip(tr, params, grads, ms, vs, strict=True):
                    n = math.prod(shape)
                    flat = [self._flat(t, n) for t in (p, g, m, v)]
                    if self.arch.is_cpu:   # in place: no second copy of weights and moments
                        r = E.inplace(inplace.build_adamw_inplace, [*flat, hyper], [0, 2, 3], n)
                    else:                  # GPU: dlight-scheduled elementwise kernel, out of place
                        r = E(optim.build_adamw, [*flat, hyper], n, n_out=3)
                    outs.append(r)
                newp = [bb.emit(relax.op.reshape(r[0], shape)) for r, (_, shape) in zip(outs, tr, strict=True)]
                newm = [bb.emit(relax.op.reshape(r[1], shape)) for r, (_, shape) in zip(outs, tr, strict=True)]
                newv = [bb.emit(relax.op.reshape(r[2], shape)) for r, (_, shape) in zip(outs, tr, strict=True)]
                o = bb.emit_output(relax.Tuple([*newp, *newm, *newv]))
            bb.emit_func_output(o)

    def build_accumulate(self):
        bb, E = self.bb, self.E
        accs, grads = self.param_vars("a_", self.trainable), self.param_vars("g_", self.trainable)
        with bb.function(ACCUMULATE, [*accs, *grads]):
            with bb.dataflow():
                outs = []
                for (_, shape), a, g in zip(self.trainable, accs, grads, strict=True):
                    n = math.prod(shape)
                    fa, fg = self._flat(a, n), self._flat(g, n)
                    if self.arch.is_cpu:
                        (r,) = E.inplace(inplace.build_accumulate_inplace, [fa, fg], [0], n)
                    else:
                        (r,) = E(elementwise.build_accumulate, [fa, fg], n)
                    outs.append(bb.emit(relax.op.reshape(r, shape)))
                o = bb.emit_output(relax.Tuple(outs))
            bb.emit_func_output(o)

    def build(self, optimizer: bool = True) -> tvm.IRModule:
        self.build_forward()
        if self.s.has_embeddings and self.s.has_head:   # whole model: forward-gradient clients
            self.build_forward(STAGE_LOSS)
        self.build_backward()
        if optimizer:
            self.build_optimizer()
            self.build_accumulate()
        return self.bb.get()
