"""PyTorch CPU baseline for a MiniLM fine-tuning step, and a FLOP count to put timings in context.

`torch_train_step_time` times a full float32 train step (forward + backward + ``torch.optim.AdamW``)
of ``BertForSequenceClassification`` loaded from the installed all-MiniLM-L6-v2 folder, using
transformers if it is installed and the independent reference (``tests/reference_bert.py``) in
float32 otherwise. It also times one encoder layer alone (forward, and forward + backward) at the
same shapes. `count_flops` gives forward matmul FLOPs (2*M*N*K per matmul, attention included).

Run as a script for a table::

    .venv/bin/python bench/torch_baseline.py --batch-size 8 --seq-len 128 --threads 2
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compiler.hf import BertConfig, default_model_dir, init_head, load_bert  # noqa: E402

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FlopCount:
    """Forward FLOPs (2*M*N*K per matmul) at batch B, sequence T.

    layer:           one encoder layer (QKV + attention scores + context + output proj + FFN)
    layer_attention: of which the two attention matmuls (QK^T and PV)
    model:           all layers + pooler + classifier (gathers and elementwise ops excluded)
    """

    batch_size: int
    seq_len: int
    layer: int
    layer_attention: int
    model: int

    @property
    def train_step(self) -> int:
        """Approximate FLOPs of forward + backward (3x forward; the optimizer step is ignored)."""
        return 3 * self.model


def count_flops(config: BertConfig | Any, B: int, T: int, num_labels: int = 2) -> FlopCount:
    """Forward matmul FLOPs of the whole classifier and of one encoder layer.

    Parameters
    ----------
    config : BertConfig or any object with hidden_size, intermediate_size, num_hidden_layers
    B, T : int
        Batch size and sequence length.
    num_labels : int
        Classifier width.

    Returns
    -------
    FlopCount
    """
    h, i, n = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    tokens = B * T
    proj = 4 * 2 * tokens * h * h  # Q, K, V, attention output
    attn = 2 * (2 * B * T * T * h)  # QK^T and PV, summed over heads (heads * dh = h)
    ffn = 2 * (2 * tokens * h * i)  # intermediate and output dense
    layer = proj + attn + ffn
    model = n * layer + 2 * B * h * h + 2 * B * h * num_labels
    return FlopCount(B, T, layer, attn, model)


@dataclass(frozen=True)
class TorchTiming:
    """Result of `torch_train_step_time` (milliseconds unless noted)."""

    impl: str
    batch_size: int
    seq_len: int
    threads: int
    dropout: bool
    steps: int
    median_ms: float
    min_ms: float
    layer_fwd_ms: float
    layer_fwd_min_ms: float
    layer_fwdbwd_ms: float
    layer_fwdbwd_min_ms: float
    import_s: float
    load_s: float
    final_loss: float


def _time(fn, steps: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def torch_train_step_time(
    batch_size: int = 8,
    seq_len: int = 128,
    threads: int = 2,
    steps: int = 5,
    dropout: bool = True,
    warmup: int = 1,
    layer_steps: int = 10,
    model_dir: str | Path | None = None,
    use_transformers: bool | None = None,
    attn_implementation: str = "sdpa",
    seed: int = 0,
) -> TorchTiming:
    """Time float32 MiniLM train steps (forward + backward + AdamW) with PyTorch on the CPU.

    Parameters
    ----------
    batch_size, seq_len : int
        Static batch shape (random token ids, no padding: compute does not depend on content).
    threads : int
        ``torch.set_num_threads`` (intra-op threads).
    steps, warmup : int
        Timed and untimed full steps.
    dropout : bool
        Train mode with the checkpoint's dropout probabilities, or dropout off.
    layer_steps : int
        Timed repetitions of the single-layer measurements (after one warm-up).
    model_dir : str or Path, optional
        Checkpoint folder; default: the installed all-MiniLM-L6-v2.
    use_transformers : bool, optional
        Force (True) or forbid (False) transformers; default: use it if importable.
    attn_implementation : str
        transformers attention kernel ("sdpa", its default, or "eager").
    seed : int

    Returns
    -------
    TorchTiming
    """
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    path = Path(model_dir) if model_dir is not None else default_model_dir()
    ck = load_bert(path)
    cfg = ck.config
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, cfg.vocab_size, (batch_size, seq_len), generator=gen)
    ids[:, 0] = 101
    am = torch.ones_like(ids)
    tt = torch.zeros_like(ids)
    labels = torch.randint(0, 2, (batch_size,), generator=gen)

    if use_transformers is None:
        import importlib.util

        use_transformers = importlib.util.find_spec("transformers") is not None
    t0 = time.perf_counter()
    if use_transformers:
        import transformers
        from transformers import BertForSequenceClassification

        t1 = time.perf_counter()
        model = BertForSequenceClassification.from_pretrained(
            str(path), num_labels=2, dtype=torch.float32, attn_implementation=attn_implementation
        )
        t2 = time.perf_counter()
        model.train(dropout)
        params = list(model.parameters())
        impl = f"transformers {transformers.__version__} ({attn_implementation})"

        def loss_fn() -> torch.Tensor:
            return model(input_ids=ids, attention_mask=am, token_type_ids=tt, labels=labels).loss

        layer = model.bert.encoder.layer[0]

        def layer_fn(x: torch.Tensor) -> torch.Tensor:
            y = layer(x)
            return y[0] if isinstance(y, tuple) else y
    else:
        from tests import reference_bert as ref

        t1 = time.perf_counter()
        weights = {**ck.weights, **init_head(cfg, 2, seed)}
        p = {k: torch.tensor(v, requires_grad=True) for k, v in weights.items()}
        t2 = time.perf_counter()
        params = list(p.values())
        rcfg = ref.RefConfig(cfg.num_attention_heads, cfg.layer_norm_eps)
        ph, pa = cfg.hidden_dropout_prob, cfg.attention_probs_dropout_prob
        nh, h = cfg.num_attention_heads, cfg.hidden_size
        impl = "tests/reference_bert (float32)"
        batch = {
            "input_ids": ids.numpy(),
            "attention_mask": am.numpy(),
            "token_type_ids": tt.numpy(),
            "labels": labels.numpy(),
        }

        def masks(prefix_only: str | None = None) -> dict[str, torch.Tensor] | None:
            if not dropout:
                return None

            def m(shape: tuple[int, ...], q: float) -> torch.Tensor:
                return torch.bernoulli(torch.full(shape, 1.0 - q)) / (1.0 - q)

            out = {}
            for site in ref.dropout_sites(cfg.num_hidden_layers):
                if prefix_only is not None and not site.startswith(prefix_only):
                    continue
                if site.endswith("attention.probs"):
                    out[site] = m((batch_size, nh, seq_len, seq_len), pa)
                elif site == "classifier":
                    out[site] = m((batch_size, h), ph)
                else:
                    out[site] = m((batch_size, seq_len, h), ph)
            return out

        def loss_fn() -> torch.Tensor:
            return ref.cross_entropy(ref.logits_torch(p, batch, rcfg, masks()), labels)

        def layer_fn(x: torch.Tensor) -> torch.Tensor:
            return ref.layer_forward(
                p, "encoder.layer.0.", x, None, rcfg, masks("encoder.layer.0.")
            )

    opt = torch.optim.AdamW(params, lr=2e-5)
    last = [float("nan")]

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        opt.step()
        last[0] = float(loss.detach())

    times = _time(step, steps, warmup)

    x = torch.randn(batch_size, seq_len, cfg.hidden_size, generator=gen, requires_grad=True)
    cot = torch.randn(batch_size, seq_len, cfg.hidden_size, generator=gen)

    def fwd() -> None:
        layer_fn(x)

    def fwdbwd() -> None:
        for q in params:
            q.grad = None
        x.grad = None
        layer_fn(x).backward(cot)

    lf = _time(fwd, layer_steps, 1)
    lb = _time(fwdbwd, layer_steps, 1)
    return TorchTiming(
        impl=impl,
        batch_size=batch_size,
        seq_len=seq_len,
        threads=threads,
        dropout=dropout,
        steps=steps,
        median_ms=statistics.median(times),
        min_ms=min(times),
        layer_fwd_ms=statistics.median(lf),
        layer_fwd_min_ms=min(lf),
        layer_fwdbwd_ms=statistics.median(lb),
        layer_fwdbwd_min_ms=min(lb),
        import_s=t1 - t0,
        load_s=t2 - t1,
        final_loss=last[0],
    )


def format_table(t: TorchTiming, f: FlopCount) -> str:
    """A small text table of a timing and its GFLOP/s (backward counted as 2x forward)."""
    rows = [
        ("train step (fwd+bwd+AdamW)", t.median_ms, t.min_ms, f.train_step),
        ("1 layer forward", t.layer_fwd_ms, t.layer_fwd_min_ms, f.layer),
        ("1 layer forward+backward", t.layer_fwdbwd_ms, t.layer_fwdbwd_min_ms, 3 * f.layer),
    ]
    lines = [
        f"{t.impl}; B={t.batch_size} T={t.seq_len} threads={t.threads} dropout={t.dropout} "
        f"steps={t.steps}; import {t.import_s:.2f} s, load {t.load_s:.2f} s",
        f"forward FLOPs: model {f.model / 1e9:.3f} G, layer {f.layer / 1e9:.3f} G "
        f"(attention matmuls {f.layer_attention / 1e9:.3f} G)",
        f"{'what':<30}{'median ms':>12}{'min ms':>12}{'GFLOP/s':>10}",
    ]
    for name, med, mn, fl in rows:
        lines.append(f"{name:<30}{med:>12.1f}{mn:>12.1f}{fl / (mn * 1e6):>10.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """CLI: time the baseline and print a table (and optionally the raw numbers as JSON)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--no-dropout", action="store_true")
    ap.add_argument(
        "--reference", action="store_true", help="use tests/reference_bert, not transformers"
    )
    ap.add_argument("--attn", default="sdpa", choices=("sdpa", "eager"))
    ap.add_argument("--json", type=Path, help="also write the numbers here")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    t = torch_train_step_time(
        a.batch_size,
        a.seq_len,
        a.threads,
        a.steps,
        not a.no_dropout,
        use_transformers=False if a.reference else None,
        attn_implementation=a.attn,
    )
    f = count_flops(load_bert(default_model_dir()).config, a.batch_size, a.seq_len)
    print(format_table(t, f))
    if a.json:
        import json

        a.json.write_text(json.dumps({"timing": asdict(t), "flops": asdict(f)}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
