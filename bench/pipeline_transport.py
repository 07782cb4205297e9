"""Part c of bench/bench_pipeline.py: activation transfer, edgert's protocol (encode -> ZeroMQ tcp
loopback -> decode, zero-copy frames; with CURVE as deployed, and without) vs JSON lists over HTTP
(stdlib http.server, json.dumps(arr.tolist()) -> json.loads -> numpy), as the Confidant prototype
does it. The receivers run in spawned processes.

    .venv/bin/python bench/bench_pipeline.py --parts c
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def stats(xs: list[float]) -> dict[str, float]:
    return {"min": min(xs), "median": statistics.median(xs), "n": len(xs)}


def _zmq_receiver(keys_dir: str | None, q) -> None:
    from edgert.protocol import Kind, Message
    from edgert.transport import KeyRing, ZmqTransport

    t = ZmqTransport("board0", keys=KeyRing(Path(keys_dir)) if keys_dir else None)
    q.put(t.bind("tcp://127.0.0.1:0"))
    while True:
        got = t.recv(None)
        if got is None:
            continue
        peer, msg = got
        n = sum(x.nbytes for x in msg.arrays().values())     # numpy views over the frames
        t.send(peer, Message.make(Kind.OK, "", msg.header.seq, body={"bytes": n}))
        if msg.kind is Kind.SHUTDOWN:
            break
    t.close()


def _http_receiver(q) -> None:
    from http.server import BaseHTTPRequestHandler, HTTPServer

    class H(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            arr = np.asarray(json.loads(body), dtype=np.float32)
            out = json.dumps({"ok": True, "shape": list(arr.shape)}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *args):
            pass

    srv = HTTPServer(("127.0.0.1", 0), H)
    q.put(srv.server_address[1])
    srv.serve_forever()


def _zmq_rounds(arr: np.ndarray, keys_dir: str | None, n: int, reps: int, stream: bool
                ) -> list[float]:
    """Seconds per message, one value per round: send -> receiver decodes -> small ack."""
    from edgert.protocol import Kind, Message
    from edgert.transport import CONTROLLER, KeyRing, ZmqTransport

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_zmq_receiver, args=(keys_dir, q), daemon=True)
    p.start()
    ep = q.get(timeout=60)
    t = ZmqTransport(CONTROLLER, keys=KeyRing(Path(keys_dir)) if keys_dir else None)
    t.connect("board0", ep)
    seq = 0

    def send():
        nonlocal seq
        seq += 1
        t.send("board0", Message.make(Kind.ACT, "", seq, step=1, stage=0, mb=seq,
                                      arrays={"hidden": arr}))

    def ack():
        got = t.recv(60)
        assert got is not None and got[1].header.body["bytes"] == arr.nbytes, got
    try:
        for _ in range(5):                           # warm-up, CURVE handshake
            send()
            ack()
        out = []
        for _ in range(reps):
            t0 = time.perf_counter()
            if stream:
                for _ in range(n):
                    send()
                for _ in range(n):
                    ack()
            else:
                for _ in range(n):
                    send()
                    ack()
            out.append((time.perf_counter() - t0) / n)
        t.send("board0", Message.make(Kind.SHUTDOWN, "", 0))
        t.recv(10)
    finally:
        t.close()
        p.join(10)
        if p.is_alive():
            p.kill()
    return out


def _http_rounds(arr: np.ndarray, n: int, reps: int) -> tuple[list[float], int]:
    import http.client

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_http_receiver, args=(q,), daemon=True)
    p.start()
    port = q.get(timeout=60)
    wire = 0

    def post():
        nonlocal wire
        body = json.dumps(arr.tolist()).encode()
        wire = len(body)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        conn.request("POST", "/act", body=body, headers={"Content-Type": "application/json"})
        r = json.loads(conn.getresponse().read())
        conn.close()
        assert r["shape"] == list(arr.shape), r

    try:
        post()                                       # warm-up
        out = []
        for _ in range(reps):
            t0 = time.perf_counter()
            for _ in range(n):
                post()
            out.append((time.perf_counter() - t0) / n)
    finally:
        p.kill()
        p.join(10)
    return out, wire


def part_transport(a: argparse.Namespace) -> dict:
    from edgert.transport import generate_keys

    rng = np.random.default_rng(0)
    tensors = {"act_1024x384_f32": rng.standard_normal((1024, 384), dtype=np.float32),
               "tensor_4MiB_f32": rng.standard_normal((1024, 1024), dtype=np.float32)}
    res: dict = {"method": "per message: sender encodes, receiver (another process) decodes to "
                           "numpy and answers a small ack; MB/s = tensor bytes / (send -> ack). "
                           "stream: n sends, then n acks.", "by_tensor": {}}
    speedup = {}
    with tempfile.TemporaryDirectory() as td:
        generate_keys(Path(td), ["board0"])
        for name, arr in tensors.items():
            mb = arr.nbytes / 1e6
            r: dict = {"shape": list(arr.shape), "bytes": arr.nbytes}
            variants = {"edgert_zmq_curve": (td, False), "edgert_zmq_plain": (None, False),
                        "edgert_zmq_curve_stream": (td, True)}
            for v, (keys, stream) in variants.items():
                s = stats(_zmq_rounds(arr, keys, a.zmq_msgs, a.reps, stream))
                r[v] = {"s_per_msg": s, "MBps": {"median": mb / s["median"], "best": mb / s["min"]}}
            hs, wire = _http_rounds(arr, a.http_msgs, a.reps)
            s = stats(hs)
            r["http_json"] = {"s_per_msg": s, "MBps": {"median": mb / s["median"],
                                                       "best": mb / s["min"]},
                              "json_wire_bytes": wire, "wire_inflation": wire / arr.nbytes}
            r["speedup_curve_vs_http_json"] = (r["edgert_zmq_curve"]["MBps"]["median"]
                                               / r["http_json"]["MBps"]["median"])
            r["speedup_plain_vs_http_json"] = (r["edgert_zmq_plain"]["MBps"]["median"]
                                               / r["http_json"]["MBps"]["median"])
            speedup[name] = r["speedup_curve_vs_http_json"]
            res["by_tensor"][name] = r
            print(f"  {name}: curve {r['edgert_zmq_curve']['MBps']['median']:.0f} MB/s, "
                  f"http/json {r['http_json']['MBps']['median']:.1f} MB/s", flush=True)
    return {"transport": res, "transport_speedup_vs_http_json": speedup}
