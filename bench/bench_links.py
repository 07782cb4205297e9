"""Pipeline training over an emulated 100 Mbit/s + 5 ms link vs loopback (needs root).

    sudo .venv/bin/python bench/bench_links.py [--rounds 3] [--steps 6] [--rate-mbit 100]

Two local boards (MiniLM-L6 in 2 stages, batch 8 x seq 64, 4 micro-batches per step, sync 1F1B,
one TVM thread each) either on 127.0.0.1 ("loopback") or each in its own network namespace with a
veth link limited by `tc tbf` both ways and a userspace relay adding the delay to every
board-to-board byte ("link"; boards/links/netlab.py). Both clusters are up at once and their
steps alternate one by one (the machine is shared: adjacent steps see the same load), and each
round also times an activation transfer: one [B, T, 384]
float32 tensor from a process where board0 is to where board1 is, plus a 1-byte ack, over the same
path (plain ZeroMQ, median of 20). Writes bench/results/links.json.

The controller's own links to the boards are rate-limited but not delayed (they carry token ids
and step requests only).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "boards" / "links"))

import netlab  # noqa: E402

from bench.bench_pipeline import bundles_for, dataset, machine_info  # noqa: E402

OUT = ROOT / "bench" / "results" / "links.json"

_RECV = """
import sys, zmq
c = zmq.Context(); s = c.socket(zmq.ROUTER); s.bind(sys.argv[1]); print("ready", flush=True)
while True:
    ident, msg = s.recv_multipart()
    if msg == b"stop": break
    s.send_multipart([ident, b"k"])
"""
_SEND = """
import sys, time, statistics, zmq
import numpy as np
B, T, n = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
a = np.ones((B, T, 384), np.float32)
c = zmq.Context(); s = c.socket(zmq.DEALER); s.connect(sys.argv[1])
s.send(b"x"); s.recv()
ts = []
for _ in range(n):
    t0 = time.perf_counter(); s.send(a, copy=False); s.recv(); ts.append(time.perf_counter() - t0)
s.send(b"stop")
print(statistics.median(ts))
"""


def transfer_ms(link: bool, batch: int, seq: int, n: int = 20) -> float:
    """Median ms to move one activation (board0's place -> board1's place) and get an ack."""
    py = sys.executable
    if link:
        recv_cmd = ["ip", "netns", "exec", netlab.ns_name(1), py, "-c", _RECV,
                    f"tcp://{netlab.board_addr(1)}:5601"]
        relay = netlab.DelayRelay((netlab.host_addr(0), 0), (netlab.board_addr(1), 5601),
                                  DELAY_MS)
        host, port = relay.start()
        send_pre, ep = ["ip", "netns", "exec", netlab.ns_name(0)], f"tcp://{host}:{port}"
    else:
        recv_cmd = [py, "-c", _RECV, "tcp://127.0.0.1:5601"]
        relay, send_pre, ep = None, [], "tcp://127.0.0.1:5601"
    rp = subprocess.Popen(recv_cmd, stdout=subprocess.PIPE, text=True)
    try:
        assert rp.stdout is not None and rp.stdout.readline().startswith("ready")
        out = subprocess.run([*send_pre, py, "-c", _SEND, ep, str(batch), str(seq), str(n)],
                             capture_output=True, text=True, check=True, timeout=300)
        return 1e3 * float(out.stdout.strip())
    finally:
        rp.wait(30)
        if relay is not None:
            relay.close()


@contextlib.contextmanager
def pipeline(link: bool, bundles, m: int):
    """A deployed 2-board cluster on loopback or on the emulated link; yields it."""
    from control.cluster import LocalCluster

    relays = []
    with LocalCluster(2, launcher=netlab.in_namespaces() if link else None,
                      start_timeout=120) as c:
        if link:   # board j reaches board i through the relay on j's own link
            for i, j in ((0, 1), (1, 0)):
                port = int(c.boards[i].endpoint.rsplit(":", 1)[1])
                r = netlab.DelayRelay((netlab.host_addr(j), 0), (netlab.board_addr(i), port),
                                      DELAY_MS)
                host, rport = r.start()
                relays.append(r)
                c.boards[i].endpoint = f"tcp://{host}:{rport}"
        c.deploy(bundles, micro_batches=m)
        c.relays = relays
        try:
            yield c
        finally:
            for r in relays:
                r.close()


def timed_step(c, micro, opt) -> dict:
    t0 = time.perf_counter()
    c.train_step(micro, opt)
    return {"step_s": time.perf_counter() - t0,
            "wait_s": {k[0]: m.header.body.get("wait_s") for k, m in c.last_step_replies.items()}}


def run_round(bundles, micro, steps: int, r: int) -> dict:
    """Both clusters up at once (idle boards cost nothing), their steps alternated one by one."""
    from control.local import OptimConfig

    opt = OptimConfig(lr=1e-4, warmup_steps=1, total_steps=steps + 1)
    out: dict = {"loopback": [], "link": []}
    with pipeline(False, bundles, len(micro[0])) as lo, pipeline(True, bundles,
                                                                  len(micro[0])) as li:
        lo.train_step(micro[0], opt)             # warm-up (first touch, connections)
        li.train_step(micro[0], opt)
        for s in range(steps):
            order = [("loopback", lo), ("link", li)]
            if (s + r) % 2:
                order.reverse()
            for cond, c in order:
                out[cond].append(timed_step(c, micro[1 + s], opt))
        out["relayed_mib"] = sum(x.bytes for x in li.relays) / 2 ** 20
    return out


def main() -> int:
    global DELAY_MS
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--micro-batches", type=int, default=4)
    p.add_argument("--rate-mbit", type=float, default=100.0)
    p.add_argument("--delay-ms", type=float, default=5.0)
    a = p.parse_args()
    if os.geteuid() != 0:
        print("bench_links needs root (network namespaces, tc)", file=sys.stderr)
        return 2
    DELAY_MS = a.delay_ms
    bundles = bundles_for(2, a.batch, a.seq)
    train, _ = dataset(a.batch, a.seq)
    m = a.micro_batches
    micro = [train[m * s:m * (s + 1)] for s in range(a.steps + 1)]
    load = [os.getloadavg()]
    rounds: list[dict] = []
    netlab.up(2, a.rate_mbit)
    try:
        for r in range(a.rounds):
            res = run_round(bundles, micro, a.steps, r)
            res["act_transfer_ms"] = {"loopback": transfer_ms(False, a.batch, a.seq),
                                      "link": transfer_ms(True, a.batch, a.seq)}
            res["loadavg"] = os.getloadavg()
            rounds.append(res)
            print(f"round {r}: step loopback "
                  f"{1e3 * statistics.median(x['step_s'] for x in res['loopback']):.0f} ms, link "
                  f"{1e3 * statistics.median(x['step_s'] for x in res['link']):.0f} ms; activation "
                  f"{res['act_transfer_ms']['loopback']:.1f} / {res['act_transfer_ms']['link']:.1f}"
                  f" ms; load {res['loadavg'][0]:.1f}", flush=True)
            load.append(os.getloadavg())
    finally:
        netlab.down(2)
    summary: dict = {}
    for cond in ("loopback", "link"):
        steps = [x["step_s"] for rr in rounds for x in rr[cond]]
        summary[cond] = {"median_step_ms": 1e3 * statistics.median(steps),
                         "min_step_ms": 1e3 * min(steps),
                         "act_transfer_ms": statistics.median(rr["act_transfer_ms"][cond]
                                                              for rr in rounds)}
    # adjacent steps (same load) paired: link / loopback
    pairs = [x["step_s"] / y["step_s"] for rr in rounds
             for x, y in zip(rr["link"], rr["loopback"], strict=True)]
    summary["step_ratio_link_vs_loopback_paired_median"] = statistics.median(pairs)
    summary["step_ratio_link_vs_loopback_of_mins"] = (summary["link"]["min_step_ms"]
                                                      / summary["loopback"]["min_step_ms"])
    summary["activations_per_step"] = 2 * a.micro_batches      # forward acts + backward grads
    act_bytes = a.batch * a.seq * 384 * 4
    summary["activation_bytes"] = act_bytes
    summary["activation_wire_ms_at_rate"] = 1e3 * act_bytes * 8 / (a.rate_mbit * 1e6)
    out = {"bench": "links", "machine": machine_info(), "loadavg": load,
           "command": " ".join(sys.argv), "config": vars(a),
           "link": {"rate_mbit": a.rate_mbit, "delay_ms_one_way": a.delay_ms,
                    "how": "netns + veth, tc tbf both ways on each board's link, userspace TCP "
                           "relay for the delay (no netem in this kernel)"},
           "summary": summary, "rounds": rounds}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(out, indent=1))
    print(json.dumps(summary, indent=1))
    return 0


DELAY_MS = 5.0

if __name__ == "__main__":
    raise SystemExit(main())
