"""Render the benchmark results (bench/results/*.json) into the README's performance section.

    .venv/bin/python bench/report.py          # rewrites the block between the PERF markers in README.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- PERF:BEGIN (bench/report.py) -->", "<!-- PERF:END -->"


def _load(name: str) -> dict | None:
    p = ROOT / "bench" / "results" / name
    return json.loads(p.read_text()) if p.is_file() else None


def train_step_table(r: dict) -> str:
    s, lay = r["train_step_ms"], r["layer_ms"]
    m = r["machine"]
    rows = [
        "| | edgert (TVM) | PyTorch 2.13 | edgert / PyTorch |",
        "|---|---|---|---|",
        f"| full train step, min (ms) | {s['edgert_min']:.0f} | {s['torch_min']:.0f} | "
        f"**{r['train_step_ratio_vs_torch']:.2f}** |",
        f"| full train step, median (ms) | {s['edgert_median']:.0f} | {s['torch_median']:.0f} | "
        f"{s['edgert_median'] / s['torch_median']:.2f} |",
        f"| PyTorch with dropout off (ms) | | {r['torch_without_dropout_ms']:.0f} | "
        f"{r['train_step_ratio_vs_torch_without_dropout']:.2f} |",
        f"| one layer forward (ms) | {lay['edgert_fwd']:.1f} | {lay['torch_fwd']:.1f} | "
        f"{lay['edgert_fwd'] / lay['torch_fwd']:.2f} |",
        f"| one layer forward + backward (ms) | {lay['edgert_fwd_bwd']:.1f} | {lay['torch_fwd_bwd']:.1f} | "
        f"{lay['edgert_fwd_bwd'] / lay['torch_fwd_bwd']:.2f} |",
        f"| one stage (2 of 3) forward + backward (ms) | {r['stage_2_layers_fwd_bwd_ms']:.0f} | | |",
        f"| achieved GFLOP/s (train step: {r['train_step_gflop']:.1f} GFLOP) | "
        f"{r['achieved_gflops']:.0f} | {r['torch_achieved_gflops']:.0f} | |",
        f"| share of measured peak ({r['peak_gflops_measured']:.0f} GFLOP/s) | "
        f"**{100 * r['peak_fraction']:.0f}%** | {100 * r['torch_peak_fraction']:.0f}% | |",
    ]
    t = r.get("tuned") or {}
    notes = [
        f"Machine: {m['cpu']} ({m['llvm_cpu']}), {m['cores']} cores, {m['threads_used']} threads; load "
        f"average during the run {', '.join(f'{x:.1f}' for x in r['load_average'])}. Peak = "
        f"{r['peak_how']}; nominal {r.get('peak_gflops_nominal') or 0:.0f} GFLOP/s. Full-model "
        f"compile: {r['compile_seconds_full_model']:.0f} s.",
    ]
    if t.get("train_step_ms_min"):
        notes.append(
            f"With this board's tuning database ({t['configs_used']} tuned kernels out of "
            f"{t['candidates_timed']} candidates timed by `edgert tune`): {t['train_step_ms_min']:.0f} ms, "
            f"{t['vs_untuned']:.2f}x the untuned step, i.e. the default schedules are already at the "
            f"best points of their search spaces here (bench/results/tuning.txt).")
    return "\n".join(rows) + "\n\n" + "\n".join(notes)


def gemm_table(g: dict) -> str:
    rows = ["| GEMM (M x N x K, layout) | edgert ms | PyTorch ms | ratio | % of peak |", "|---|---|---|---|---|"]
    for s in g.get("shapes", []):
        lay = ("A^T " if s["trans_a"] else "") + ("B^T" if s["trans_b"] else "") + \
            (" +bias" if s["bias"] else "") + (f" +{s['epilogue']}" if s["epilogue"] else "")
        rows.append(f"| {s['name']}: {s['M']}x{s['N']}x{s['K']} {lay} | {s['tvm_ms']:.2f} | "
                    f"{s['torch_ms']:.2f} | {s['ratio_tvm_over_torch']:.2f} | "
                    f"{100 * s['fraction_of_measured_peak']:.0f}% |")
    return "\n".join(rows)


def pipeline_table(p: dict) -> str:
    eff, rss = p["efficiency_vs_ideal"], p["peak_rss_ratio_vs_single"]
    rows = ["| K boards | efficiency (speed-up / K) | ideal (M=4) | peak RSS of the largest board / single device |",
            "|---|---|---|---|"]
    for k in sorted(set(eff) | set(rss), key=int):
        e = eff.get(k, {})
        note = " (boards share 2 cores)" if e.get("shared_cores") else ""
        rows.append(f"| {k} | {e.get('efficiency', float('nan')):.2f}{note} | {e.get('ideal', float('nan')):.2f} | "
                    f"{rss.get(k, float('nan')):.2f} |")
    t = p["transport_speedup_vs_http_json"]
    notes = [f"Activation transfer, our protocol (CURVE-encrypted ZeroMQ, raw frames) vs JSON lists over "
             f"HTTP (the Confidant prototype's way): {', '.join(f'{k} {v:.0f}x' for k, v in t.items())} faster."]
    ceil = eff.get("2", {}).get("efficiency_vs_machine_ceiling")
    if ceil:
        notes.append(f"K=2 against what two independent single-core jobs reached at the same time on this "
                     f"(shared) machine: {ceil:.2f} (ideal 0.80).")
    runs = [p] + [r for r in [_load("pipeline_async_lr1e-4.json")] if r]
    gaps = [f"{r['async_vs_sync_accuracy_gap_points']:+.1f} points at lr {r['convergence']['lr']:g}"
            for r in runs if r.get("async_vs_sync_accuracy_gap_points") is not None]
    if gaps:
        notes.append("Async (PipeDream-2BW, exact: checked against a single-process 2BW reference) vs sync "
                     "held-out accuracy after equal steps (40 x 4 x 8): " + "; ".join(gaps) +
                     " (see docs/pipeline.md).")
    return "\n".join(rows) + "\n\n" + "\n".join(notes)


def memory_table(m: dict) -> str:
    r, bal = m["peak_rss_ratio_vs_single"], m["compute_balance"]
    rows = ["| K boards | largest board / single device: even split | memory-first split | "
            "compute balance even -> memory-first |", "|---|---|---|---|"]
    for k in sorted(r["even"], key=int):
        if k == "1":
            continue
        rows.append(f"| {k} | {r['even'][k]:.2f} | **{r['memory_first'][k]:.2f}** | "
                    f"{bal['even'][k]:.2f} -> {bal['memory_first'][k]:.2f} |")
    return ("Peak RSS per board (`bench/bench_memory.py`, `bench/results/memory.json`; MiniLM, batch "
            f"{m['batch']} x {m['seq']}, M = {m['micro_batches']}; single device "
            f"{m['single_board_peak_rss_mib']:.0f} MiB; memory-first = `plan(objective=\"memory\")`):"
            "\n\n" + "\n".join(rows) + "\n\nCompute balance = mean / max per-board compute time: "
            "memory-first splits trade pipeline speed for the smaller largest board.")


def faults_line(f: dict) -> str:
    s = (f"Fault tolerance (`bench/bench_faults.py`, `bench/results/faults.json`): a board killed "
         f"mid-step is detected in {f['detect_seconds']:.2f} s; re-plan + compile (cache) + deploy + "
         f"load the checkpoint takes {f['recovery_seconds']:.1f} s "
         f"(= {f['recovery_in_steps']:.0f} steps of {f['step_seconds_2_boards_median']:.2f} s); "
         f"{f['steps_redone']} step(s) redone.")
    if f.get("throttled_speedup_vs_even") is not None:
        s += (f" One board throttled to a quarter of the other's speed: the re-planned split runs "
              f"{f['throttled_speedup_vs_even']:.2f}x the even split's throughput.")
    return s


def _far_rows(a: dict) -> list[str]:
    """One markdown row per metric: full | FAR | FAR + frozen embeddings | FAR random."""
    acc, st, paired = a["accuracy"], a["settings"], a.get("paired_step_ratio_median", {})
    med = a["step_ms_median"]
    modes = [m for m in ("far_l1", "far_l1_frozen_emb", "far_random") if m in med]
    ratio = {m: med[m] / med["full"] for m in modes}
    rows = ["| | full fine-tuning | " + " | ".join(_FAR_NAMES[m] for m in modes) + " |",
            "|---|---|" + "---|" * len(modes),
            f"| step time vs full (median of paired steps) | 1 | "
            + " | ".join(f"**{paired[m]:.2f}**" for m in modes) + " |",
            f"| step time vs full (ratio of medians) | 1 | "
            + " | ".join(f"{ratio[m]:.2f}" for m in modes) + " |",
            f"| held-out accuracy ({st['eval_examples']} sentences) | {100 * acc['full']:.1f}% | "
            + " | ".join(f"{100 * acc[m]:.1f}%" for m in modes) + " |"]
    rss = a.get("peak_rss_mib", {})
    if rss:
        rows.append(f"| peak RSS (MiB) | {rss['full']['peak_rss_mib']:.0f} | "
                    + " | ".join(f"{rss[m]['peak_rss_mib']:.0f}" if m in rss else "-"
                                 for m in modes) + " |")
    return rows


_FAR_NAMES = {"far_l1": "FAR (top-L1)", "far_l1_frozen_emb": "FAR + frozen embeddings",
              "far_random": "FAR (random nodes)"}


def far_table(a: dict) -> str:
    st = a["settings"]
    out = (f"FAR (`bench/bench_far.py`, `bench/results/far.json`; retention {st['retention']}, "
           f"{st['steps']} steps incl. {st['priming_steps']} priming, batch {st['batch']} x "
           f"{st['seq']}, lr {st['lr']:g}, steps interleaved on the same batches):\n\n"
           + "\n".join(_far_rows(a)))
    e = _load("far_edge.json")
    if e:
        se = e["settings"]
        out += (f"\n\nThe same at an edge micro-batch (`bench/results/far_edge.json`; batch "
                f"{se['batch']} x {se['seq']}, {se['steps']} steps incl. {se['priming_steps']} "
                f"priming, lr {se['lr']:g}):\n\n" + "\n".join(_far_rows(e)))
    sweep = a.get("shape_sweep")
    if sweep:
        out += ("\n\nStep time by shape (paired ratios vs full, FAR / FAR + frozen embeddings; "
                "FLOP bound of FAR + frozen embeddings in brackets): " + ", ".join(
                    f"{k}: {v['paired_step_ratio_median']['far_l1']:.2f} / "
                    f"{v['paired_step_ratio_median']['far_l1_frozen_emb']:.2f} "
                    f"({v['flop_bound']['far_l1_frozen_emb']['ratio_bound']:.2f})"
                    for k, v in sorted(sweep.items(), key=lambda kv: kv[1]["tokens"])) + "."
                + (" Plot: `bench/results/far_step_ratio.svg`." if a.get("plots") else ""))
        met = [k for k, v in sorted(sweep.items(), key=lambda kv: kv[1]["tokens"])
               if v["paired_step_ratio_median"]["far_l1_frozen_emb"] <= 0.7]
        out += (f" Goal <= 0.7x: met at {', '.join(met)} (FAR + frozen embeddings)" if met else
                " Goal <= 0.7x: not met at any swept shape") + "."
    return out + " Why: docs/far.md."


def prune_line(p: dict) -> str:
    st, m = p["settings"], p["modes"]
    names = {"full": "full", "bitfit": "BitFit", "lora": "LoRA r 8", "adapter": "adapters r 16",
             "far_emb_frozen": "FAR + frozen embeddings"}
    return ("Dead-code pruning of compiled stages (`compiler.build.prune`; `bench/bench_prune.py`, "
            f"`bench/results/prune.json`; whole MiniLM, batch {st['batch']} x {st['seq']}, the same "
            "batches interleaved, step time with / without the pass, paired): " + ", ".join(
                f"{names.get(k, k)} {v['paired_ratio_on_vs_off']:.2f}x "
                f"({v['backward_calls']['emitted']} -> {v['backward_calls']['after_prune']} "
                f"backward calls)" for k, v in m.items())
            + "; losses identical in every mode: " + ("yes" if all(v["losses_identical"]
                                                                  for v in m.values()) else "NO")
            + ".")


def fwdgrad_table(g: dict) -> str:
    rows = ["| method | held-out loss | accuracy | wall (s) | peak RSS per board (MiB) |",
            "|---|---|---|---|---|",
            f"| before | {g['before']['loss']:.4f} | {100 * g['before']['accuracy']:.1f}% | | |"]
    for name, r in g["runs"].items():
        rss = r.get("peak_rss_mib")
        rss = max(rss) if isinstance(rss, list) else rss
        rows.append(f"| {name} | {r['after']['loss']:.4f} | {100 * r['after']['accuracy']:.1f}% | "
                    f"{r['seconds']:.0f} | {rss:.0f} |")
    st = g["settings"]
    return (f"Forward gradients (`bench/bench_fwdgrad.py`, `bench/results/fwdgrad.json`; "
            f"{st['clients']} boards as federated clients, {st['rounds']} rounds, k = {st['k']} "
            f"perturbations, batch {st['batch']} x {st['seq']}):\n\n" + "\n".join(rows) +
            f"\n\nPeak RSS of a forward-gradient board / backprop full fine-tuning: "
            f"{g['peak_rss_ratio_vs_bp_full']:.2f} (target <= 0.3: "
            f"{'met' if g['peak_rss_ratio_vs_bp_full'] <= 0.3 else 'not met'}; docs/fwdgrad.md).")


def decoder_table(d: dict) -> str:
    k3, k1, st = d["k3"], d["k1"], d["settings"]
    med = lambda r: sorted(r["step_ms"])[len(r["step_ms"]) // 2]  # noqa: E731
    rss = lambda r: ", ".join(f"{b['peak_rss_mib']:.0f}" for b in r["boards"])  # noqa: E731
    rows = [f"| | {k3['stages']} boards | 1 board | ratio |", "|---|---|---|---|",
            f"| held-out perplexity | {k3['ppl_before']:.2f} -> {d['ppl_after']:.2f} | "
            f"{k1['ppl_before']:.2f} -> {k1.get('ppl_after', d['ppl_after']):.2f} | |",
            f"| median step (ms) | {med(k3):.0f} | {med(k1):.0f} | "
            f"{d['ratios']['step_time_k3_over_k1_median']:.2f} |",
            f"| peak RSS per board (MiB) | {rss(k3)} | {rss(k1)} | largest board "
            f"{d['ratios']['largest_board_rss_k3_over_k1']:.2f} |"]
    la = max(max(v) for v in d["loadavg"].values())
    return ("SmolLM2-135M causal-LM LoRA fine-tuning (`bench/bench_decoder.py`, "
            f"`bench/results/decoder.json`; {d['layers']} layers, LoRA r = {st['lora_rank']}, "
            f"{st['steps']} steps of {st['micro_batches']} x {st['batch']} x {st['seq']} tokens, "
            f"movie dialog; both jobs interleaved step by step):\n\n" + "\n".join(rows) +
            f"\n\nTraining losses of the two agree to {d['losses_max_rel_diff_k3_vs_k1']:.1e} "
            f"(relative). Load average up to {la:.0f} during the run; on 2 cores three boards "
            "are not faster, the gain is memory per board.")


def head_split_table(h: dict) -> str:
    s = h["shape"]
    out = (f"Attention head split over two backends (`bench/bench_head_split.py`, "
           f"`bench/results/head_split.json`; two worker processes pinned to the two cores): one "
           f"attention layer fwd + bwd (B {s['B']}, T {s['T']}, H {s['H']}) at the tuned split "
           f"k = {h['chosen_k']} ({h['chosen_k']} / {s['H'] - h['chosen_k']} heads) takes {h['chosen_split_ms']:.1f} ms vs {h['best_single_backend_ms']:.1f} ms "
           f"on the best single backend: **split_vs_best_single = {h['split_vs_best_single']:.2f}** "
           f"(ideal 0.5); the tuner measured {h['tuner_measurements']} points instead of "
           f"{h['exhaustive_measurements']}.")
    if "stage_fwd_bwd_ms" in h:
        m, st = h["stage_fwd_bwd_ms"], h["stage_shape"]
        out += (f" Inside a whole training stage (layers {st['layers'][0]}..{st['layers'][1] - 1}"
                f", fwd + bwd, median ms): unsplit 1 thread {m['unsplit_1t']:.0f}, unsplit 2 "
                f"threads {m['unsplit_2t']:.0f}, split at k = 6 {m['split_k6']:.0f}, at the "
                f"board's tuned k = {h['stage_tuned_split']['k']} {m['split_tuned']:.0f}. Both "
                "cores already work inside every unsplit kernel, so on this VM the split only adds "
                "its copies and the board's tuner keeps the layer whole; a CPU + GPU board is "
                "where it pays (docs/head_split.md).")
    return out


def links_table(l: dict) -> str:
    s = l["summary"]
    rows = ["| | loopback | {:.0f} Mbit/s + {:.0f} ms |".format(l["link"]["rate_mbit"],
                                                            l["link"]["delay_ms_one_way"]),
            "|---|---|---|",
            f"| one activation ({s['activation_bytes'] >> 10} KiB) + ack, median | "
            f"{s['loopback']['act_transfer_ms']:.1f} ms | {s['link']['act_transfer_ms']:.1f} ms "
            f"(wire time {s['activation_wire_ms_at_rate']:.1f} ms) |",
            f"| pipeline step, median | {s['loopback']['median_step_ms']:.0f} ms | "
            f"{s['link']['median_step_ms']:.0f} ms (paired ratio "
            f"{s['step_ratio_link_vs_loopback_paired_median']:.2f}) |"]
    la = max(max(x) for x in l["loadavg"])
    return ("Emulated link (`bench/bench_links.py`, `bench/results/links.json`; network namespaces, "
            "tc tbf + a userspace delay relay, docs/boards.md):\n\n" + "\n".join(rows) +
            f"\n\nLoad average up to {la:.0f} during this run: compute was several times slower "
            "than on a quiet machine, and 1F1B hid the transfers behind it.")


def main() -> int:
    parts = []
    r = _load("train_step.json")
    if r:
        parts.append(train_step_table(r))
    g = _load("gemm.json")
    if g and g.get("shapes"):
        parts.append("Per-shape GEMMs (`bench/bench_gemm.py`, `bench/results/gemm.json`):\n\n" + gemm_table(g))
    p = _load("pipeline.json")
    if p:
        parts.append("Pipeline across local boards (`bench/bench_pipeline.py`, `bench/results/pipeline.json`,"
                     " MiniLM batch 8 x 64, one core per board):\n\n" + pipeline_table(p))
    for name, fn in (("memory.json", memory_table), ("faults.json", faults_line),
                     ("far.json", far_table), ("prune.json", prune_line),
                     ("fwdgrad.json", fwdgrad_table),
                     ("decoder.json", decoder_table), ("head_split.json", head_split_table),
                     ("links.json", links_table)):
        d = _load(name)
        if d:
            parts.append(fn(d))
    readme = ROOT / "README.md"
    text = readme.read_text()
    if BEGIN not in text:
        print("README has no PERF markers", file=sys.stderr)
        return 1
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(head + BEGIN + "\n" + "\n\n".join(parts) + "\n" + END + tail)
    return 0


if __name__ == "__main__":
    sys.exit(main())
