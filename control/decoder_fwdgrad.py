"""Forward-gradient (FwdLLM-style) federated fine-tuning of a LLaMA-style decoder's LoRA factors.

Each board is a client holding one whole-model decoder bundle (LoRA on the fused QKV) and its own
shard of movie-dialog blocks; every round it evaluates central differences of its causal-LM loss
along seeded perturbations of the LoRA B factors (A stays at its random start: with B = 0 the loss
does not depend on A to first order; see control/fwdgrad.trainable_names) and returns scalars;
the controller aggregates (variance control and the cosine sampler of control/fwdgrad.py) and
steps SGD. Held-out perplexity is measured before and after in this process. The machinery is the
BERT one (control/federated.py, edgert/fwdgrad.py; rounds in control/fwdgrad_run.py `drive`): the
board reads the decoder's data inputs from its manifest and runs the forward-only `stage_loss`
entry.

    edgert lm --fwdgrad --clients 2 --rounds 20 --layers 4
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from control.decoder import (
    compile_decoder_bundles,
    corpus_blocks,
    held_out_batches,
    lm_batches,
    load_decoder,
    perplexity,
)
from control.fwdgrad import FwdGradConfig, trainable_names
from edgert.errors import ConfigError

log = logging.getLogger(__name__)


def fwdgrad_lm(*, clients: int = 2, rounds: int = 20, layers: int | None = None, lora: int = 8,
               batch: int = 2, seq: int = 32, blocks_per_client: int = 32, k: int = 8,
               k_max: int | None = None, var_threshold: float = 0.0, pool: int = 1,
               lr: float = 0.01, momentum: float = 0.0, eps: float = 1e-3, eval_blocks: int = 8,
               seed: int = 0, out_dir: str | Path = "runs/lm_fwdgrad", boards: bool = True,
               model: str | Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Run the job; returns a report dict (perplexity before/after, per-round log, board memory).

    Examples
    --------
    >>> rep = fwdgrad_lm(clients=2, rounds=4, layers=2, seq=16)   # doctest: +SKIP
    >>> rep["ppl_before"] > 0                                      # doctest: +SKIP
    True
    """
    from control.events import EventLog
    from control.federated import run_clients
    from control.fwdgrad_run import FwdGradRun, RoundLog, drive
    from control.local import LocalPipeline
    from edgert.fwdgrad import ForwardClient

    if clients < 1 or rounds < 1 or blocks_per_client < batch:
        raise ConfigError(f"need clients >= 1, rounds >= 1 and blocks_per_client >= batch "
                          f"({batch}); got {clients}, {rounds}, {blocks_per_client}")
    cfg = FwdGradConfig(eps=eps, lr=lr, momentum=momentum, k_init=k, k_max=k_max or k,
                        var_threshold=var_threshold, pool_factor=pool, seed=seed)
    out = Path(out_dir)
    dec = load_decoder(model, layers=layers)
    t0 = time.perf_counter()
    (bundle,) = compile_decoder_bundles(dec, out / "bundles", stages=1, lora=lora, batch=batch,
                                        seq=seq, seed=seed)
    compile_s = time.perf_counter() - t0
    blocks = corpus_blocks(dec.tokenizer_file, seq, clients * blocks_per_client)
    shards = [lm_batches(blocks[c::clients], blocks_per_client)[0] for c in range(clients)]
    held = held_out_batches(dec.tokenizer_file, seq, batch, eval_blocks)
    pipe = LocalPipeline([bundle])
    stage = pipe.stages[0]
    base = stage.params_numpy()
    names = trainable_names(list(base), "lora")
    rep: dict[str, Any] = {"model": dec.model_id, "layers": dec.config.num_hidden_layers,
                           "clients": clients, "rounds": rounds, "lora_rank": lora,
                           "batch": batch, "seq": seq, "trainable": int(sum(base[n].size
                                                                            for n in names)),
                           "cfg": asdict(cfg),
                           "compile_s": round(compile_s, 1), "ppl_before": None}

    def held_out(values: dict[str, np.ndarray]) -> dict[str, float]:
        ForwardClient(stage).set_values(values)
        return {"perplexity": perplexity(pipe, held)}

    def show(r: int, rec: RoundLog) -> None:
        print(f"  round {r + 1}/{rounds}: clients' loss {rec.loss:.4f}, k {rec.k}, "
              f"{rec.seconds:.1f}s", flush=True)

    def train(cl: Any) -> FwdGradRun:
        srv = FwdGradRun(cl, names, {n: base[n] for n in names}, cfg, rows_per_round=batch)
        curve.extend(drive(srv, rounds=rounds, events=EventLog(), evaluate=held_out,
                           ckpt_root=None, progress=show if progress else False))
        return srv

    t0 = time.perf_counter()
    curve: list[dict[str, Any]] = []
    srv, mem = run_clients(train, bundle, stage, shards, boards=boards, threads=1, seed=seed)
    rep.update(mem)
    rep["train_s"] = round(time.perf_counter() - t0, 1)   # boards, rounds, held-out evaluation
    rep["ppl_before"], rep["ppl_after"] = curve[0]["perplexity"], curve[-1]["perplexity"]
    rep["log"] = [asdict(r) for r in srv.log]
    log.info("fwdgrad lm: ppl %.2f -> %.2f", rep["ppl_before"], rep["ppl_after"])
    return rep
