"""Relax graph of one pipeline stage of a LLaMA-style decoder (causal-LM fine-tuning).

Same entry points and conventions as compiler/stage.py (whose `Emitter`, optimizer and gradient
accumulation are reused by subclassing `StageGraph`):

  stage_forward(*data, seed, *params)         -> (hidden, *saved)
                                                 (loss, logits, *saved) on the last stage
  stage_backward(*saved, dout, seed, *params) -> (dhidden, *grads) | grads on the first stage
  optimizer_step / grad_accumulate            -> as compiler/stage.py (AdamW, in place)

data = (input_ids) on the first stage, else (hidden [B*T, H]); then attention_mask [B, T]; then
labels [B, T] on the last stage (next-token targets are labels shifted by one; -100 ignored).
``seed`` is accepted for interface compatibility (the decoder has no dropout).

One layer (pre-norm, every op a kernel with a hand-written VJP):
  n1 = rmsnorm(h) ; qkv = n1 Wqkv^T ; qkr = rope(qkv) ; ctx, P = causal_gqa(qkr)
  s2 = h + ctx Wo^T  and  n2 = rmsnorm(s2)       (one fused add+norm kernel)
  gu = n2 Wgu^T ; a = silu(g) * u ; out = a Wd^T + s2   (residual add fused in the GEMM epilogue)
Last stage: hn = rmsnorm(h), logits = hn Whead^T, shifted cross-entropy (compiler/kernels/lm.py).
"""

from __future__ import annotations

from tvm import relax

from compiler import qstage
from compiler.arch import Arch
from compiler.kernels import causal_attention as CA
from compiler.kernels import gemm, lm, rmsnorm, rope, swiglu
from compiler.llama import GATE_UP, LORA_A, LORA_B, QKV, DecoderSpec, LlamaConfig, stage_params
from compiler.peft import build_scale
from compiler.stage import Emitter, StageGraph, _tt
from edgert.artifact import STAGE_BACKWARD, STAGE_FORWARD
from edgert.contract import ACTIVATION, SEED_DTYPE, SEED_SHAPE


HEAD_SLICE = 4096   # vocabulary rows per head-GEMM call; see [Note: head workspace]
_NO_PACK = {"pack_b": False}   # never pack the [V, H] head weight (a 113 MB workspace per call)


class DecoderStageGraph(StageGraph):
    """Builds the IRModule of one decoder stage (see the module docstring)."""

    def __init__(self, cfg: LlamaConfig, spec: DecoderSpec, arch: Arch, dtype: str = "float32",
                 configs: dict[str, dict] | None = None):
        self.c, self.s, self.arch, self.dtype = cfg, spec, arch, dtype
        self.M = spec.batch * spec.seq
        self.params = stage_params(cfg, spec)
        fz = set(spec.frozen)   # See [Note: frozen params] in compiler/stage.py
        self.trainable = [p for p in self.params if p[0] not in fz]
        self.stored = qstage.stored_types(spec, cfg)   # quantized frozen weights (uint8 blocks)
        self.bb = relax.BlockBuilder()
        self.E = Emitter(self.bb, arch, dtype, configs or {})
        self.saved_names: list[str] = []
        self.C = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim

    def data_vars(self) -> list[relax.Var]:
        B, T, H = self.s.batch, self.s.seq, self.c.hidden_size
        vs = [relax.Var("input_ids", _tt((B, T), "int64")) if self.s.has_embeddings
              else relax.Var(ACTIVATION, _tt((B * T, H), self.dtype))]
        vs.append(relax.Var("attention_mask", _tt((B, T), "int64")))
        if self.s.has_head:
            vs.append(relax.Var("labels", _tt((B, T), "int64")))
        return vs

    def _rope_tables(self):
        cos, sin = rope.rope_tables(self.s.seq, self.c.head_dim, self.c.rope_theta, self.dtype)
        return relax.const(cos, self.dtype), relax.const(sin, self.dtype)

    # ---- forward --------------------------------------------------------------------------
    def _layer_fwd(self, h, maskf, tabs, P):
        E, c, M = self.E, self.c, self.M
        B, T, H, I, d = self.s.batch, self.s.seq, c.hidden_size, c.intermediate_size, c.head_dim
        nh, nkv, C = c.num_attention_heads, c.num_key_value_heads, self.C
        n1, _, r1 = E(rmsnorm.build_rmsnorm_fwd, [h, P["input_layernorm.weight"]], M, H, n_out=3,
                      eps=c.rms_norm_eps, residual=False)
        (qkv,) = E(gemm.build_gemm, [n1, P[QKV]], M, C, H, trans_b=True)
        lora = {}
        if self.s.lora_rank:    # qkv += s (n1 A^T) B^T
            r = self.s.lora_rank
            (xa,) = E(gemm.build_gemm, [n1, P[LORA_A]], M, r, H, trans_b=True)
            (xs,) = E(build_scale, [xa], M, r, s=self._lora_scale())
            (qkv,) = E(gemm.build_gemm, [xs, P[LORA_B], qkv], M, C, r, trans_b=True,
                       epilogue="add")
            lora = {"lora_xs": xs}
        (qkr,) = E(rope.build_rope, [qkv, *tabs], B, T, nh, nkv, d)
        ctx, probs = E(CA.build_causal_attention_fwd, [qkr, maskf], B, T, nh, nkv, d, n_out=2)
        (o,) = E(gemm.build_gemm, [ctx, P["self_attn.o_proj.weight"]], M, H, nh * d, trans_b=True)
        n2, s2, r2 = E(rmsnorm.build_rmsnorm_fwd, [o, h, P["post_attention_layernorm.weight"]],
                       M, H, n_out=3, eps=c.rms_norm_eps, residual=True)
        (gu,) = E(gemm.build_gemm, [n2, P[GATE_UP]], M, 2 * I, H, trans_b=True)
        (a,) = E(swiglu.build_swiglu_fwd, [gu], M, I)
        (out,) = E(gemm.build_gemm, [a, P["mlp.down_proj.weight"], s2], M, H, I, trans_b=True,
                   epilogue="add")
        return out, dict(h=h, r1=r1, n1=n1, qkr=qkr, probs=probs, ctx=ctx, s2=s2, r2=r2, n2=n2,
                         gu=gu, a=a, **lora)

    def _lora_scale(self) -> float:
        return self.s.lora_alpha / self.s.lora_rank

    def _wants(self, name: str) -> bool:
        """Whether the backward computes `name`'s weight gradient (frozen ones are skipped)."""
        return name not in self.s.frozen

    def _head_fwd(self, h, labels, P):
        E, c, M = self.E, self.c, self.M
        B, T, H, V = self.s.batch, self.s.seq, c.hidden_size, c.vocab_size
        hn, _, rf = E(rmsnorm.build_rmsnorm_fwd, [h, P["model.norm.weight"]], M, H, n_out=3,
                      eps=c.rms_norm_eps, residual=False)
        logits = self._head_gemm(hn, P[self._head_name()])
        lossv, lse = E(lm.build_lm_loss_fwd, [logits, labels], B, T, V, n_out=2)
        return lossv, logits, dict(h=h, rf=rf, hn=hn, logits=logits, lse=lse, labels=labels)

    def _head_gemm(self, hn, w):
        """logits [M, V] = hn w^T in vocabulary slices of <= HEAD_SLICE rows.

        [Note: head workspace] One trans_b GEMM over the whole vocabulary packs all of w into a
        113 MB TVM workspace per call. That large block, reused by TVM's workspace pool, is what
        exposed the out-of-bounds read of causal_attention_bwd (fixed there: [Note: no indices
        under Select]); the slices stay because they keep every workspace under 10 MB on a board."""
        E, M, H, V = self.E, self.M, self.c.hidden_size, self.c.vocab_size
        n = next(k for k in range(1, V + 1) if V % k == 0 and V // k <= HEAD_SLICE)
        if n == 1:
            return E(gemm.build_gemm, [hn, w], M, V, H, trans_b=True)[0]
        Vs, parts = V // n, []
        for i in range(n):
            wi = self.bb.emit(relax.op.strided_slice(w, axes=[0], begin=[i * Vs],
                                                     end=[(i + 1) * Vs]))
            parts.append(E(gemm.build_gemm, [hn, wi], M, Vs, H, trans_b=True)[0])
        return self.bb.emit(relax.op.concat(parts, axis=1))

    def _head_name(self) -> str:
        if self.c.tie_word_embeddings and self.s.has_embeddings:
            return "model.embed_tokens.weight"
        return "lm_head.weight"

    def build_forward(self, name: str = STAGE_FORWARD):
        """stage_forward; or (name = edgert.artifact.STAGE_LOSS, which StageGraph.build adds for a
        whole-model stage) the forward-only (loss, logits) without saved activations."""
        bb, s, c = self.bb, self.s, self.c
        only = name != STAGE_FORWARD
        data = self.data_vars()
        seed = relax.Var("seed", _tt(SEED_SHAPE, SEED_DTYPE))
        pv = self.param_vars()
        P = {n: v for (n, _), v in zip(self.params, pv, strict=True)}
        with bb.function(name, [*data, *pv] if only else [*data, seed, *pv]):
            with bb.dataflow():
                x, mask = data[0], data[1]
                maskf = bb.emit(relax.op.astype(mask, self.dtype))
                tabs = self._rope_tables()
                saved: list[tuple[str, relax.Expr]] = [("maskf", maskf)]
                if s.has_embeddings:
                    (h,) = self.E(lm.build_tok_embed_fwd, [x, P["model.embed_tokens.weight"]],
                                  s.batch, s.seq, c.vocab_size, c.hidden_size)
                    saved.append(("emb.ids", x))
                else:
                    h = x
                for li in range(s.first, s.last):
                    pre = f"model.layers.{li}."
                    LP = {k[len(pre):]: v for k, v in P.items() if k.startswith(pre)}
                    h, sv = self._layer_fwd(h, maskf, tabs, LP)
                    saved += [(f"layer{li}.{k}", v) for k, v in sv.items()]
                if s.has_head:
                    lossv, logits, sv = self._head_fwd(h, data[2], P)
                    saved += [(f"head.{k}", v) for k, v in sv.items()]
                    outs = [lossv, logits]
                else:
                    outs = [h]
                if only:            # the saved tensors become dead: the planner reuses them
                    saved = []
                else:
                    self.saved_names = [n for n, _ in saved]
                o = bb.emit_output(relax.Tuple(outs + [v for _, v in saved]))
            bb.emit_func_output(o)
        if not only:
            self._saved_types = [v.ty for _, v in saved]

    # ---- backward -------------------------------------------------------------------------
    def _layer_bwd(self, dout, S, P, G, pre=""):
        E, c, M = self.E, self.c, self.M
        B, T, H, I, d = self.s.batch, self.s.seq, c.hidden_size, c.intermediate_size, c.head_dim
        nh, nkv, C = c.num_attention_heads, c.num_key_value_heads, self.C
        want = lambda k: self._wants(pre + k)  # noqa: E731
        if want("mlp.down_proj.weight"):
            (G["mlp.down_proj.weight"],) = E(gemm.build_gemm, [dout, S["a"]], H, I, M,
                                             trans_a=True)
        (da,) = E(gemm.build_gemm, [dout, P["mlp.down_proj.weight"]], M, I, H)
        (dgu,) = E(swiglu.build_swiglu_bwd, [da, S["gu"]], M, I)
        if want(GATE_UP):
            (G[GATE_UP],) = E(gemm.build_gemm, [dgu, S["n2"]], 2 * I, H, M, trans_a=True)
        (dn2,) = E(gemm.build_gemm, [dgu, P[GATE_UP]], M, H, 2 * I)
        ds2, G["post_attention_layernorm.weight"] = E(
            rmsnorm.build_rmsnorm_bwd, [dn2, S["s2"], S["r2"], P["post_attention_layernorm.weight"],
                                        dout], M, H, n_out=2, residual_grad=True)
        if want("self_attn.o_proj.weight"):
            (G["self_attn.o_proj.weight"],) = E(gemm.build_gemm, [ds2, S["ctx"]], H, nh * d, M,
                                                trans_a=True)
        (dctx,) = E(gemm.build_gemm, [ds2, P["self_attn.o_proj.weight"]], M, nh * d, H)
        (dqkr,) = E(CA.build_causal_attention_bwd, [S["qkr"], S["probs"], dctx], B, T, nh, nkv, d)
        (dqkv,) = E(rope.build_rope, [dqkr, *self._rope_tables()], B, T, nh, nkv, d, inverse=True)
        if want(QKV):
            (G[QKV],) = E(gemm.build_gemm, [dqkv, S["n1"]], C, H, M, trans_a=True)
        (dn1,) = E(gemm.build_gemm, [dqkv, P[QKV]], M, H, C)
        if self.s.lora_rank:    # dB = dqkv^T xs ; dA = (s dqkv B)^T n1 ; dn1 += (s dqkv B) A
            r = self.s.lora_rank
            (G[LORA_B],) = E(gemm.build_gemm, [dqkv, S["lora_xs"]], C, r, M, trans_a=True)
            (dxs,) = E(gemm.build_gemm, [dqkv, P[LORA_B]], M, r, C)
            (dxa,) = E(build_scale, [dxs], M, r, s=self._lora_scale())
            (G[LORA_A],) = E(gemm.build_gemm, [dxa, S["n1"]], r, H, M, trans_a=True)
            (dn1,) = E(gemm.build_gemm, [dxa, P[LORA_A], dn1], M, H, r, epilogue="add")
        dh, G["input_layernorm.weight"] = E(
            rmsnorm.build_rmsnorm_bwd, [dn1, S["h"], S["r1"], P["input_layernorm.weight"], ds2],
            M, H, n_out=2, residual_grad=True)
        return dh

    def _head_bwd(self, scale, S, P, G):
        E, c, M = self.E, self.c, self.M
        B, T, H, V = self.s.batch, self.s.seq, c.hidden_size, c.vocab_size
        head = self._head_name()
        if not self._wants(head):   # frozen head: dhn = dlogits W, one GEMM over the vocabulary
            (dl,) = E(lm.build_lm_loss_bwd, [S["logits"], S["lse"], S["labels"], scale], B, T, V)
            dl2 = self.bb.emit(relax.op.reshape(dl, (M, V)))
            (dhn,) = E(gemm.build_gemm, [dl2, P[head]], M, H, V, config=_NO_PACK)
            return self._final_norm_bwd(dhn, S, P, G)
        # vocabulary-chunked head backward: see [Note: head accumulation] in kernels/lm.py
        Vc = lm.head_chunk(V)
        nb = V // Vc
        (dl,) = E(lm.build_lm_loss_bwd, [S["logits"], S["lse"], S["labels"], scale], B, T, V,
                  chunk=Vc)                                                   # [nb, M, Vc]
        if self._wants(head):
            (hn_rep,) = E(lm.build_replicate, [S["hn"]], nb, M, H)           # [nb, M, H]
            (dw3,) = E(gemm.build_gemm, [dl, hn_rep], Vc, H, M, trans_a=True, batch=(nb,))
            G[head + "@head"] = self.bb.emit(relax.op.reshape(dw3, (V, H)))
        w3 = self.bb.emit(relax.op.reshape(P[head], (nb, Vc, H)))
        (parts,) = E(gemm.build_gemm, [dl, w3], M, H, Vc, batch=(nb,),          # [nb, M, H]
                     config=_NO_PACK)
        (dhn,) = E(lm.build_chunk_sum, [parts], nb, M, H)
        return self._final_norm_bwd(dhn, S, P, G)

    def _final_norm_bwd(self, dhn, S, P, G):
        E, M, H = self.E, self.M, self.c.hidden_size
        dh, G["model.norm.weight"] = E(rmsnorm.build_rmsnorm_bwd, [dhn, S["h"], S["rf"],
                                                                   P["model.norm.weight"]],
                                       M, H, n_out=2, residual_grad=False)
        return dh

    def build_backward(self):
        bb, s, c = self.bb, self.s, self.c
        saved_vars = [relax.Var("s_" + n.replace(".", "_"), t)
                      for n, t in zip(self.saved_names, self._saved_types, strict=True)]
        dout = (relax.Var("loss_scale", _tt((1,), self.dtype)) if s.has_head
                else relax.Var("dhidden", _tt((self.M, c.hidden_size), self.dtype)))
        seed = relax.Var("seed", _tt(SEED_SHAPE, SEED_DTYPE))
        pv = self.param_vars()
        P = {n: v for (n, _), v in zip(self.params, pv, strict=True)}
        SV = dict(zip(self.saved_names, saved_vars, strict=True))
        G: dict[str, relax.Expr] = {}
        with bb.function(STAGE_BACKWARD, [*saved_vars, dout, seed, *pv]):
            with bb.dataflow():
                if s.has_head:
                    S = {k[5:]: v for k, v in SV.items() if k.startswith("head.")}
                    dh = self._head_bwd(dout, S, P, G)
                else:
                    dh = dout
                for li in reversed(range(s.first, s.last)):
                    pre = f"model.layers.{li}."
                    LP = {k[len(pre):]: v for k, v in P.items() if k.startswith(pre)}
                    S = {k.split(".", 1)[1]: v for k, v in SV.items()
                         if k.startswith(f"layer{li}.")}
                    LG: dict[str, relax.Expr] = {}
                    dh = self._layer_bwd(dh, S, LP, LG, pre)
                    G.update({pre + k: v for k, v in LG.items()})
                if s.has_embeddings and self._wants("model.embed_tokens.weight"):
                    (G["model.embed_tokens.weight"],) = self.E(
                        lm.build_tok_embed_bwd, [SV["emb.ids"], dh], s.batch, s.seq,
                        c.vocab_size, c.hidden_size)
                self._merge_head(G)
                grads = [G[n] for n, _ in self.trainable]
                outs = grads if s.has_embeddings else [dh, *grads]
                o = bb.emit_output(relax.Tuple(outs))
            bb.emit_func_output(o)

    def _merge_head(self, G) -> None:
        """The head GEMM's weight gradient: its own parameter, or added to the tied embedding's."""
        for k in [k for k in G if k.endswith("@head")]:
            name = k[: -len("@head")]
            G[name] = self.bb.emit(relax.op.add(G[name], G.pop(k))) if name in G else G.pop(k)


def decoder_stage_module(cfg: LlamaConfig, spec: DecoderSpec, arch: Arch, dtype: str = "float32",
                         optimizer: bool = True):
    """(IRModule, graph) of one decoder stage; compile with ``tvm.compile`` (see tests)."""
    g = DecoderStageGraph(cfg, spec, arch, dtype)
    return g.build(optimizer=optimizer), g

