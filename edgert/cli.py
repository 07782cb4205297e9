"""`edgert` command line.

    edgert train                       # the main job with every default (MiniLM-L6, Rotten Tomatoes, 2 stages)
    edgert train --stages 3 --steps 60 --seq 128
    edgert train --peft adapter --adapter-size 16 --lr 5e-3   # or --peft lora|bitfit (docs/peft.md)
    edgert compile --stages 3 --target arm64 --out build/arm64
    edgert grads --model DIR --stages 2 --batch BATCH.npz --out OUT.npz
    edgert tune --budget 600                   # tune the kernels on this board (resumable)
    edgert keys --out keys --boards board0,board1          # CURVE keys for a cluster
    edgert serve --name board0 --port 5555 --keys keys --budget-mib 2048   # on a board
    edgert serve --name board0 --keys keys --board rk3588     # budget/threads/port from a profile
    edgert probe                               # which backends this board can really use
    edgert plan --board pi0:1024 --board pi1:1024:0.25 --board orin:4096:2:4 --bandwidth-mbps 100
    edgert run run.toml --out runs/night      # unattended run: checkpoints, recovery, report
    edgert resume runs/night                   # continue it (after Ctrl-C or a crash)
    edgert fwdgrad --clients 3 --rounds 20     # backprop-free federated fine-tuning (forward gradients)
    edgert lm --boards 3 --lora 8 --prompt "Hello"   # SmolLM2 LoRA on 3 local boards, perplexity, generation

Host commands import the compiler lazily; board commands never do.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

from edgert.errors import ConfigError, EdgeError


def _common_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, default=None,
                   help="Hugging Face BERT folder (config.json, model.safetensors, tokenizer.json); "
                        "default: the installed all-MiniLM-L6-v2")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--stages", type=int, default=None, help="K even pipeline stages (by layer)")
    g.add_argument("--split", default=None, help="explicit layer ranges, e.g. 0:2,2:4,4:6")
    p.add_argument("--threads", type=int, default=None, help="TVM worker threads (default: all cores)")


def _tuning_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", type=Path, default=None,
                   help="tuning database (default: this board's, from `edgert tune`, if it exists)")
    p.add_argument("--no-tuning", action="store_true",
                   help="ignore tuning databases: the default schedules")


def _tuning(a: argparse.Namespace) -> dict:
    if a.no_tuning and a.db:
        raise ConfigError("--db and --no-tuning contradict each other: pass one")
    return {"configs": {} if a.no_tuning else None, "tuning_db": a.db}


def cmd_train(a: argparse.Namespace) -> int:
    from control.job import finetune

    if a.far is not None and a.peft:
        raise ConfigError("--far and --peft are two different trainable sets: pass one of them")
    if a.head_split and (a.far is not None or a.peft):
        raise ConfigError("--head-split is available for full fine-tuning only for now: drop "
                          "--head-split, or --far / --peft")
    if (a.registry or a.boards_named or a.target != "host") and (a.far is not None or a.peft):
        raise ConfigError("--registry/--boards-named/--target are available for full "
                          "fine-tuning for now: drop them, or --far / --peft")
    if a.boards_named and not a.registry:
        raise ConfigError("--boards-named picks boards of a registry: add --registry "
                          "KEYS/boards.json")
    if a.far_freeze_embeddings and a.far is None:
        raise ConfigError("--far-freeze-embeddings goes with --far RETENTION, e.g. --far 0.4")
    if a.far is not None:
        return _train_far(a)
    if a.peft or a.adapter_size is not None or a.lora_rank is not None or a.lora_alpha is not None:
        return _train_peft(a)
    rep = finetune(model_dir=a.model, out_dir=a.out, stages=a.stages or (None if a.split else 2),
                   split=a.split, steps=a.steps, batch=a.batch, micro_batches=a.micro_batches,
                   seq=a.seq, lr=a.lr, eval_examples=a.eval_examples, seed=a.seed, threads=a.threads,
                   boards=not a.in_process, head_split=a.head_split, registry=a.registry,
                   board_names=a.boards_named, target=a.target, **_tuning(a))
    print(rep.summary())
    for b in rep.boards:
        if b.get("head_split"):
            hs = b["head_split"]
            print(f"  {b['name']}: attention heads [0, {hs['k']}) on cpu0, [{hs['k']}, {hs['H']}) "
                  f"on cpu1 ({hs['source']})")
    print(f"  report: {Path(a.out) / 'report.json'}; fine-tuned Hugging Face model: "
          f"{Path(a.out) / 'hf_model'}")
    return 0


def cmd_fwdgrad(a: argparse.Namespace) -> int:
    """Forward-gradient (FwdLLM-style) federated fine-tuning on local boards (docs/fwdgrad.md)."""
    from control.federated import fwdgrad_finetune
    from control.fwdgrad import FwdGradConfig

    cfg = FwdGradConfig(eps=a.eps, lr=a.lr, momentum=a.momentum, k_init=a.k, k_max=max(a.k, a.k_max),
                        var_threshold=a.var_threshold, pool_factor=a.pool, seed=a.seed)
    rep = fwdgrad_finetune(model_dir=a.model, out_dir=a.out, clients=a.clients, rounds=a.rounds,
                           method=a.method, alpha=a.non_iid, batch=a.batch, seq=a.seq,
                           rows_per_round=a.rows or a.batch, eval_examples=a.eval_examples,
                           seed=a.seed, cfg=cfg, boards=not a.in_process,
                           checkpoint_every=a.checkpoint_every, resume=not a.no_resume,
                           eval_every=a.eval_every)
    b, f = rep["before"], rep["after"]
    print(f"forward-gradient {a.method}: {a.rounds} rounds x {a.clients} clients, "
          f"{rep['trainable']} trainable values")
    print(f"  held-out loss     {b['loss']:.4f} -> {f['loss']:.4f}")
    print(f"  held-out accuracy {100 * b['accuracy']:.1f}% -> {100 * f['accuracy']:.1f}%")
    print(f"  uplink per round {rep['bytes_per_round']['up_mean']:.0f} B (gradient tensors would be "
          f"{rep['bytes_per_round']['up_if_gradient_tensors']} B); report: {Path(a.out) / 'report.json'}")
    return 0


def _fwdgrad_parser(sub) -> None:
    f = sub.add_parser("fwdgrad", help="backprop-free federated fine-tuning (forward gradients)")
    f.add_argument("--model", type=Path, default=None, help="Hugging Face BERT folder")
    f.add_argument("--clients", type=int, default=3, help="local board processes (clients)")
    f.add_argument("--rounds", type=int, default=20)
    f.add_argument("--method", choices=["bitfit", "head", "lora"], default="bitfit",
                   help="trainable set (lora: LoRA B factors + head of a LoRA bundle)")
    f.add_argument("--non-iid", type=float, default=None, metavar="ALPHA",
                   help="label-skewed shards, Dirichlet alpha (default: IID)")
    f.add_argument("--k", type=int, default=8, help="perturbations per client and round")
    f.add_argument("--k-max", type=int, default=64, help="cap when --var-threshold grows k")
    f.add_argument("--var-threshold", type=float, default=0.0,
                   help="grow k until the estimate's noise share is below this (0 = fixed k)")
    f.add_argument("--pool", type=int, default=1, help="cosine-filtered sampler pool factor")
    f.add_argument("--eps", type=float, default=1e-3)
    f.add_argument("--lr", type=float, default=0.005)
    f.add_argument("--momentum", type=float, default=0.0)
    f.add_argument("--batch", type=int, default=8)
    f.add_argument("--seq", type=int, default=32)
    f.add_argument("--rows", type=int, default=0, help="examples per client and round (default: batch)")
    f.add_argument("--eval-examples", type=int, default=128)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--out", type=Path, default=Path("runs/fwdgrad"),
                   help="run directory: report.json, events.jsonl (the dashboard reads it), "
                        "report.html, checkpoints/; if it holds a checkpoint the run resumes from it")
    f.add_argument("--checkpoint-every", type=int, default=5, metavar="N",
                   help="save the server state every N rounds and at the end (0 = never)")
    f.add_argument("--no-resume", action="store_true",
                   help="start afresh, deleting --out's checkpoints and events (default: "
                        "resume; --rounds is the total, resuming needs the same other settings)")
    f.add_argument("--eval-every", type=int, default=0, metavar="N",
                   help="held-out evaluation every N rounds (round 0 and the last always)")
    f.add_argument("--in-process", action="store_true", help="clients in this process, no boards")
    f.set_defaults(func=cmd_fwdgrad)


def _train_peft(a: argparse.Namespace) -> int:
    from control.peft_train import PeftConfig, finetune_peft

    sizes = {"adapter": ("adapter_size",), "lora": ("lora_rank", "lora_alpha"), "bitfit": ()}
    stray = [k for k in ("adapter_size", "lora_rank", "lora_alpha")
             if getattr(a, k) is not None and k not in sizes.get(a.peft, ())]
    if stray:
        flag, want = "--" + stray[0].replace("_", "-"), stray[0].split("_")[0]
        raise ConfigError(f"{flag} applies to --peft {want} only (got --peft {a.peft}): "
                          f"add --peft {want} or drop {flag}")
    peft = PeftConfig(a.peft, **{k: getattr(a, k) for k in sizes[a.peft]
                                 if getattr(a, k) is not None})
    rep = finetune_peft(peft=peft, model_dir=a.model, out_dir=a.out,
                        stages=a.stages or (None if a.split else 2), split=a.split, steps=a.steps,
                        batch=a.batch, micro_batches=a.micro_batches, seq=a.seq, lr=a.lr,
                        eval_examples=a.eval_examples, seed=a.seed, threads=a.threads,
                        boards=not a.in_process, **_tuning(a))
    print(rep.summary())
    print(f"  report: {Path(a.out) / 'report.json'}; fine-tuned Hugging Face model: "
          f"{Path(a.out) / 'hf_model'}" + (" (+ adapters.safetensors)" if a.peft == "adapter"
                                           else ""))
    return 0


def _train_far(a: argparse.Namespace) -> int:
    from control.far import FarConfig, finetune_far, summary

    cfg = _tuning(a)["configs"]
    far = FarConfig(retention=a.far, freeze_embeddings=a.far_freeze_embeddings)
    rep = finetune_far(far=far, model_dir=a.model, out_dir=a.out,
                       stages=a.stages or (None if a.split else 2), split=a.split, steps=a.steps,
                       batch=a.batch, micro_batches=a.micro_batches, seq=a.seq, lr=a.lr,
                       eval_examples=a.eval_examples, seed=a.seed, threads=a.threads, configs=cfg,
                       boards=not a.in_process)
    print(summary(rep))
    print(f"  report: {Path(a.out) / 'report.json'}; plan: {rep['plan']}; fine-tuned Hugging Face "
          f"model: {Path(a.out) / 'hf_model'}")
    return 0


def cmd_compile(a: argparse.Namespace) -> int:
    from control.job import compile_bundles, load_model

    model = load_model(a.model, num_labels=a.num_labels)
    paths = compile_bundles(model, a.out, stages=a.stages, split=a.split, batch=a.batch, seq=a.seq,
                            target=a.target, dropout=not a.no_dropout, threads=a.threads,
                            head_split=a.head_split, **_tuning(a))
    for p in paths:
        print(p)
    return 0


def cmd_grads(a: argparse.Namespace) -> int:
    import numpy as np

    from compiler.model_spec import split_qkv
    from control.data import load_batch
    from control.job import compile_bundles, load_model
    from control.local import LocalPipeline

    batch = load_batch(a.batch).as_dict()
    B, T = batch["input_ids"].shape
    model = load_model(a.model, num_labels=a.num_labels, head_seed=a.seed)
    from compiler.hf import load_bert

    ckpt_names = set(load_bert(model.path).weights)
    out_root = Path(a.work) if a.work else Path(a.out).with_suffix(".bundles")
    paths = compile_bundles(model, out_root, stages=a.stages, split=a.split, batch=B, seq=T,
                            threads=a.threads, **_tuning(a))
    pipe = LocalPipeline(paths, threads=a.threads)
    loss, grads = pipe.grads(batch)
    merged: dict = {}
    for g in grads:
        merged.update(g)
    out = {"loss": np.array(loss, np.float64)}
    out.update({f"grad/{k}": v for k, v in split_qkv(merged).items()})
    out.update({f"param/{k}": v for k, v in model.hf_weights().items() if k not in ckpt_names})
    np.savez(a.out, **out)
    print(f"loss {loss:.6f}; {len(merged)} gradient tensors -> {a.out}")
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def cmd_tune(a: argparse.Namespace) -> int:
    # TVM's pool reads this once, when tvm is imported (see edgert/runtime.py).
    os.environ.setdefault("TVM_NUM_THREADS", str(a.threads or len(os.sched_getaffinity(0))))
    from compiler import tuning
    from compiler.arch import get_arch
    from compiler.model_spec import parse_split, stage_specs
    from control.job import load_model

    model = load_model(a.model, num_labels=a.num_labels)
    arch = get_arch(a.target, a.threads)
    specs = stage_specs(parse_split(a.split, a.stages, model.dims.layers), a.batch, a.seq,
                        not a.no_dropout)
    db = tuning.TuningDB(a.db or tuning.default_db_path())
    print(f"tuning {model.model_id} B={a.batch} T={a.seq} on {arch.name} for {a.budget:.0f}s "
          f"-> {db.path}", file=sys.stderr)
    signal.signal(signal.SIGTERM, _interrupt)   # `kill`/`timeout` stop it like Ctrl-C
    gain = tuning.MIN_GAIN if a.min_gain is None else a.min_gain
    rep = tuning.tune(model, specs, arch, db, a.budget, progress=tuning.print_progress,
                      min_gain=gain)
    print(rep.format())
    return 130 if rep.interrupted else 0


def cmd_keys(a: argparse.Namespace) -> int:
    from edgert.transport import generate_keys

    ring = generate_keys(a.out, [b for b in a.boards.split(",") if b])
    print(f"keys in {ring.root}: copy public/ to every machine, private/<name>.key_secret to "
          f"that machine only")
    return 0


def _board_spec(text: str) -> tuple[str, float | None, float, float | None]:
    """NAME:BUDGET_MIB[:SPEED[:ACCEL_SPEED]]; BUDGET_MIB may be '-' (unlimited)."""
    parts = text.split(":")
    try:
        if not 2 <= len(parts) <= 4 or not parts[0]:
            raise ValueError
        budget = None if parts[1] == "-" else float(parts[1])
        speed = float(parts[2]) if len(parts) > 2 else 1.0
        accel = float(parts[3]) if len(parts) > 3 else None
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: write NAME:BUDGET_MIB[:SPEED[:ACCEL_SPEED]], e.g. pi4:1024:0.25 "
            f"(speeds relative to this host; '-' for no budget)") from None
    return parts[0], budget, speed, accel


def cmd_plan(a: argparse.Namespace) -> int:
    import json

    from compiler.hf import default_model_dir, read_config
    from compiler.model_spec import ModelDims
    from control.partition import HOST_GFLOPS, MIB, Board, Links, bert_costs, host_gflops, plan

    dims = ModelDims.from_config(read_config(a.model or default_model_dir()), a.num_labels)
    ref, bench = HOST_GFLOPS, Path(__file__).resolve().parents[1] / "bench/results/train_step.json"
    if bench.is_file():
        ref = host_gflops(json.loads(bench.read_text()), dims)
    boards = [Board(n, None if b is None else int(b * MIB), gflops=ref * s,
                    accel_gflops=None if x is None else ref * x, accel_sync_ms=a.accel_sync_ms)
              for n, b, s, x in a.board]
    links = Links(None if a.bandwidth_mbps is None else a.bandwidth_mbps * 1e6 / 8,
                  a.latency_ms / 1e3)
    p = plan(bert_costs(dims, a.batch, a.seq), boards, a.micro_batches, links=links,
             objective=a.objective,
             search_order=a.search_order)
    print(p.explain())
    print(f"speeds relative to {ref:.0f} GFLOP/s; compile with: --split {p.to_split()}")
    return 0


def _serve_profile(a: argparse.Namespace) -> None:
    """--board PROFILE: its budget, threads, listen address and port, unless given explicitly,
    and its backends (probed on first PROFILE request; see edgert/backends.py)."""
    a.backends = ("cpu",)
    if a.board is not None:
        from edgert.profile import load_profile

        prof = load_profile(a.board)
        a.budget_mib = prof.budget_mib if a.budget_mib is None else a.budget_mib
        a.threads = prof.threads if a.threads is None else a.threads
        a.host = prof.reach.bind if a.host is None else a.host
        a.port = prof.reach.port if a.port is None else a.port
        a.backends = prof.backends
    a.host = "127.0.0.1" if a.host is None else a.host
    a.port = 0 if a.port is None else a.port


def cmd_serve(a: argparse.Namespace) -> int:
    from edgert.board import MIB, BoardConfig, BoardDaemon
    from edgert.transport import KeyRing, ZmqTransport

    _serve_profile(a)
    workdir = a.workdir or Path(f"/tmp/edgert-{a.name}-{os.getpid()}")
    if not a.telemetry_s > 0:
        raise ConfigError(f"--telemetry-s must be > 0 seconds, got {a.telemetry_s}")
    cfg = BoardConfig(name=a.name, workdir=workdir, threads=a.threads, telemetry_s=a.telemetry_s,
                      budget_bytes=None if a.budget_mib is None else int(a.budget_mib * MIB),
                      backends=a.backends)
    t = ZmqTransport(a.name, keys=KeyRing(a.keys),
                     max_msg_bytes=int(a.max_msg_mib * MIB))
    try:
        endpoint = t.bind(f"tcp://{a.host}:{a.port}")
        t.bind_pub(f"tcp://{a.host}:{a.telemetry_port}")   # its endpoint: in the HELLO reply
        print(f"edgert-board {a.name} listening {endpoint}", flush=True)
        BoardDaemon(cfg, t).serve()
    finally:
        t.close()
    return 0


def cmd_probe(a: argparse.Namespace) -> int:
    import json

    from edgert import backends

    report = backends.probe()
    use, notes = backends.resolve(a.backends.split(","), report)
    if a.json:
        print(json.dumps({**report, "use": use, "notes": notes}, indent=1))
        return 0
    cpu = report.get("cpu", {})
    print(f"cpu: {cpu.get('cores')} core(s) in {len(cpu.get('clusters', []))} cluster(s), "
          f"isa {' '.join(cpu.get('isa', [])) or '?'}")
    print(f"TVM runtime device APIs: "
          f"{', '.join(k for k, v in report.get('tvm', {}).get('device_api', {}).items() if v)}")
    for p in report.get("opencl", {}).get("platforms", []):
        print(f"OpenCL platform: {p['name']} ({p['devices']} device(s))")
    print(f"backends to use: {', '.join(use)}")
    for n in notes:
        print(f"  note: {n}")
    return 0


def cmd_run(a: argparse.Namespace) -> int:
    from control.run_cli import run_command

    return run_command(a.config, a.out, resume_only=False)


def cmd_resume(a: argparse.Namespace) -> int:
    from control.run_cli import run_command

    return run_command(None, a.dir, resume_only=True)


def cmd_lm(a: argparse.Namespace) -> int:
    from control.decoder import finetune_lm

    if a.fwdgrad:
        return _lm_fwdgrad(a)
    r = finetune_lm(steps=a.steps, stages=a.stages, split=a.split, lora=a.lora, layers=a.layers,
                    batch=a.batch, seq=a.seq, lr=1e-4 if a.lr is None else a.lr,
                    micro_batches=a.micro_batches,
                    boards=a.boards, threads=a.threads, prompt=a.prompt,
                    max_new_tokens=a.max_new_tokens, temperature=a.temperature, model=a.model,
                    out=a.out, seed=a.seed)
    where = f"{len(r.boards)} local boards" if r.boards else "this process"
    print(f"causal-LM fine-tuning, {r.steps} steps, stages {r.split} on {where}, "
          f"compile {r.compile_s:.1f}s")
    print(f"  held-out perplexity {r.ppl_before:.2f} -> {r.ppl_after:.2f}")
    if r.losses:
        print(f"  train loss first/last {r.losses[0]:.4f} / {r.losses[-1]:.4f}; median step "
              f"{sorted(r.step_ms)[len(r.step_ms) // 2]:.0f} ms")
    for b in r.boards:
        print(f"  {b['name']}: stage {b['stage']}, peak RSS {b['peak_rss_mib']:.0f} MiB")
    print(f"  greedy:  {r.generation!r}\n  sampled: {r.sample!r}")
    return 0


def _lm_fwdgrad(a: argparse.Namespace) -> int:
    from control.decoder_fwdgrad import fwdgrad_lm

    if a.stages != 1 or a.split:
        raise ConfigError("--fwdgrad clients hold the whole model: drop --stages / --split")
    r = fwdgrad_lm(clients=a.boards or 2, rounds=a.rounds, layers=a.layers, lora=a.lora or 8,
                   batch=a.batch, seq=a.seq, k=a.k, lr=0.01 if a.lr is None else a.lr,
                   seed=a.seed, out_dir=a.out, model=a.model)
    print(f"forward-gradient LoRA, {r['clients']} board clients x {r['rounds']} rounds, "
          f"{r['trainable']} trainable values, compile {r['compile_s']:.1f}s, "
          f"train {r['train_s']:.1f}s")
    print(f"  held-out perplexity {r['ppl_before']:.2f} -> {r['ppl_after']:.2f}")
    print(f"  uplink {r['bytes_up']} bytes in all; peak RSS per board "
          + ", ".join(f"{x:.0f}" for x in r["peak_rss_mib"]) + " MiB")
    return 0


def _lm_parser(sub) -> None:
    m = sub.add_parser("lm", help="causal-LM fine-tuning of SmolLM2 (docs/decoder.md)",
                       description="Fine-tune SmolLM2 (or a LLaMA GGUF/HF folder) on movie dialog "
                       "through compiled decoder stages: held-out perplexity before/after, then a "
                       "greedy and a sampled continuation. --boards N runs stage i on local board "
                       "process i (edgert serve, CURVE ZeroMQ, 1F1B over --micro-batches); "
                       "multi-stage runs need --lora R (the tied embedding/head gradient "
                       "exchange for full fine-tuning is not implemented). Example: "
                       "edgert lm --boards 3 --lora 8 --micro-batches 3 --steps 10")
    m.add_argument("--model", default=None, help="GGUF file or HF LLaMA folder (default SmolLM2)")
    m.add_argument("--layers", type=int, default=None, help="keep only the first N layers")
    m.add_argument("--stages", type=int, default=1)
    m.add_argument("--split", default=None, help="layer ranges, e.g. 0:10,10:20,20:30")
    m.add_argument("--lora", type=int, default=0, help="LoRA rank on the fused QKV (0 = full)")
    m.add_argument("--steps", type=int, default=20)
    m.add_argument("--batch", type=int, default=2)
    m.add_argument("--seq", type=int, default=32)
    m.add_argument("--lr", type=float, default=None,
                   help="AdamW lr (default 1e-4); with --fwdgrad the server SGD lr (default 0.01)")
    m.add_argument("--fwdgrad", action="store_true",
                   help="backprop-free federated LoRA: --boards N clients (default 2) each run "
                        "perturbed forward passes on their own text shard (docs/fwdgrad.md)")
    m.add_argument("--rounds", type=int, default=20, help="--fwdgrad: federated rounds")
    m.add_argument("--k", type=int, default=8, help="--fwdgrad: perturbations per client/round")
    m.add_argument("--micro-batches", type=int, default=1,
                   help="batches per optimizer step (pipelined 1F1B on boards)")
    m.add_argument("--boards", type=int, default=0,
                   help="run the stages on N local board processes (0 = in this process)")
    m.add_argument("--threads", type=int, default=None,
                   help="TVM threads per board (default: cores / boards)")
    m.add_argument("--prompt", default=None)
    m.add_argument("--max-new-tokens", type=int, default=8)
    m.add_argument("--temperature", type=float, default=0.8, help="for the sampled continuation")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--out", type=Path, default=Path("build/lm"), help="bundle directory")
    m.set_defaults(func=cmd_lm)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="fine-tune on Rotten Tomatoes through compiled stages")
    _common_model(t)
    t.add_argument("--steps", type=int, default=60)
    t.add_argument("--batch", type=int, default=8, help="micro-batch size (compiled shape)")
    t.add_argument("--micro-batches", type=int, default=2, help="micro-batches per optimizer step")
    t.add_argument("--seq", type=int, default=64, help="sequence length (compiled shape)")
    t.add_argument("--lr", type=float, default=2e-4)
    t.add_argument("--eval-examples", type=int, default=256)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", type=Path, default=Path("runs/quickstart"))
    t.add_argument("--in-process", action="store_true",
                   help="run every stage in this process instead of one local board process per stage")
    t.add_argument("--far", type=float, default=None, metavar="RETENTION",
                   help="FAR: after 5%% priming steps train only this share of each FFN's nodes "
                        "(e.g. 0.4; on the boards, or with --in-process; docs/far.md)")
    t.add_argument("--far-freeze-embeddings", action="store_true",
                   help="with --far: also freeze the embeddings after priming (the paper's "
                        "operating point; skips their backward and AdamW)")
    t.add_argument("--peft", choices=("bitfit", "lora", "adapter"), default=None,
                   help="train only a parameter-efficient set (docs/peft.md): biases, LoRA "
                        "factors on the QKV, or bottleneck adapters + LayerNorms (+ the head)")
    t.add_argument("--adapter-size", type=int, default=None, help="--peft adapter: bottleneck "
                   "size r (default 16)")
    t.add_argument("--lora-rank", type=int, default=None, help="--peft lora: rank (default 8)")
    t.add_argument("--lora-alpha", type=float, default=None, help="--peft lora: alpha (default 16)")
    t.add_argument("--head-split", action="store_true",
                   help="split every attention layer's heads over each board's two backends at "
                        "the split the board tunes on load (docs/head_split.md)")
    t.add_argument("--registry", type=Path, default=None, metavar="KEYS/boards.json",
                   help="train on running board daemons of this registry (boards/provision.sh "
                        "--start writes it) instead of local processes (docs/boards.md)")
    t.add_argument("--boards-named", type=lambda x: [n for n in x.split(",") if n], default=None,
                   metavar="rk0,pi0", help="with --registry: which boards, in stage order")
    t.add_argument("--target", default="host",
                   help="compile the stages for this target (host, arm64, mali, adreno)")
    _tuning_flags(t)
    t.set_defaults(func=cmd_train)
    _fwdgrad_parser(sub)

    c = sub.add_parser("compile", help="compile stage bundles for a target")
    _common_model(c)
    c.add_argument("--batch", type=int, default=8)
    c.add_argument("--seq", type=int, default=128)
    c.add_argument("--num-labels", type=int, default=2)
    c.add_argument("--target", default="host", help="host, arm64, mali or adreno")
    c.add_argument("--no-dropout", action="store_true")
    c.add_argument("--head-split", action="store_true",
                   help="attention through the board's head-split executor (docs/head_split.md)")
    c.add_argument("--out", type=Path, required=True)
    _tuning_flags(c)
    c.set_defaults(func=cmd_compile)

    g = sub.add_parser("grads", help="loss and gradients of one batch (dropout off) for checking")
    _common_model(g)
    g.add_argument("--batch", type=Path, required=True, help=".npz with input_ids, attention_mask, "
                   "[token_type_ids], labels (int64)")
    g.add_argument("--num-labels", type=int, default=2)
    g.add_argument("--seed", type=int, default=0, help="seed of the new classifier head")
    g.add_argument("--work", type=Path, default=None, help="where to put the compiled bundles")
    g.add_argument("--out", type=Path, required=True)
    _tuning_flags(g)
    g.set_defaults(func=cmd_grads)

    u = sub.add_parser("tune", help="tune the kernels on this board into its tuning database")
    _common_model(u)
    u.add_argument("--batch", type=int, default=8)
    u.add_argument("--seq", type=int, default=128)
    u.add_argument("--num-labels", type=int, default=2)
    u.add_argument("--no-dropout", action="store_true")
    u.add_argument("--budget", type=float, default=600.0, help="seconds; re-run to resume")
    u.add_argument("--db", type=Path, default=None,
                   help="tuning database (default: ~/.cache/edgert/tuning/<hostname>.json)")
    u.add_argument("--target", default="host", help="a CPU target this machine runs (host)")
    u.add_argument("--min-gain", type=float, default=None,
                   help="use a tuned config only if this much faster (default 0.05)")
    u.set_defaults(func=cmd_tune)

    k = sub.add_parser("keys", help="create a cluster's CURVE keypairs (controller + boards)")
    k.add_argument("--out", type=Path, required=True)
    k.add_argument("--boards", required=True, help="comma-separated board names")
    k.set_defaults(func=cmd_keys)

    q = sub.add_parser("plan", help="choose stage boundaries for boards (docs/partition.md)")
    q.add_argument("--model", type=Path, default=None,
                   help="Hugging Face BERT folder (default: MiniLM)")
    q.add_argument("--board", type=_board_spec, action="append", required=True,
                   help="NAME:BUDGET_MIB[:SPEED[:ACCEL_SPEED]] in pipeline order, one per board; "
                        "speeds relative to this host")
    q.add_argument("--batch", type=int, default=8, help="micro-batch size")
    q.add_argument("--seq", type=int, default=128)
    q.add_argument("--micro-batches", type=int, default=4, help="micro-batches per optimizer step")
    q.add_argument("--num-labels", type=int, default=2)
    q.add_argument("--bandwidth-mbps", type=float, default=None, help="link speed (default: free)")
    q.add_argument("--latency-ms", type=float, default=0.0)
    q.add_argument("--accel-sync-ms", type=float, default=0.0,
                   help="per-layer cost of splitting heads onto a board's accelerator")
    q.add_argument("--search-order", action="store_true", help="also try every board order")
    q.add_argument("--objective", choices=("time", "memory"), default="time",
                   help="time: the fastest pipeline that fits every budget; memory: the smallest "
                        "largest-board footprint (docs/pipeline.md, memory-first plans)")
    q.set_defaults(func=cmd_plan)

    s = sub.add_parser("serve", help="run the board daemon (TVM runtime only)")
    s.add_argument("--name", required=True, help="this board's name (= its key name)")
    s.add_argument("--board", default=None,
                   help="board profile (name in boards/profiles or a .toml path): its budget, "
                        "threads, listen address and port are the defaults")
    s.add_argument("--host", default=None, help="listen address (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=None, help="0 (default): the OS picks; printed on start")
    s.add_argument("--keys", type=Path, required=True,
                   help="cluster key directory (edgert keys); only its keys may connect")
    s.add_argument("--budget-mib", type=float, default=None, help="memory budget for a stage")
    s.add_argument("--max-msg-mib", type=float, default=257.0, help="largest frame accepted")
    s.add_argument("--workdir", type=Path, default=None, help="where deployed bundles go")
    s.add_argument("--threads", type=int, default=None)
    s.add_argument("--telemetry-s", type=float, default=1.0,
                   help="seconds between pushed telemetry records (also sent after each step)")
    s.add_argument("--telemetry-port", type=int, default=0,
                   help="telemetry PUB port (0: the OS picks; the HELLO reply names it)")
    s.set_defaults(func=cmd_serve)

    b = sub.add_parser("probe", help="which backends (cpu, opencl, cuda) this board can really use")
    b.add_argument("--backends", default="cpu,opencl,cuda",
                   help="the wish list to resolve (a board profile's backends)")
    b.add_argument("--json", action="store_true", help="the full probe report as JSON")
    b.set_defaults(func=cmd_probe)

    r = sub.add_parser("run", help="an unattended run: checkpoints, recovery from lost boards, "
                                   "report (docs/runs.md); continues DIR if it holds this run")
    r.add_argument("config", nargs="?", type=Path, default=None,
                   help="run.toml (flat keys of control.run_config.RunConfig; default: defaults)")
    r.add_argument("--out", type=Path, default=Path("runs/run"), help="the run directory")
    r.set_defaults(func=cmd_run)
    rr = sub.add_parser("resume", help="continue a run directory from its newest checkpoint")
    rr.add_argument("dir", type=Path, help="the run directory (edgert run --out DIR)")
    rr.set_defaults(func=cmd_resume)
    _lm_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.verbose or os.environ.get("EDGERT_LOG") == "debug" else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except EdgeError as e:
        print(f"edgert: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("edgert: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
