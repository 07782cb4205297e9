"""Emulated links between local boards: network namespaces + veth + `tc tbf` + a delaying TCP relay.

    python boards/links/netlab.py up --boards 2 --rate-mbit 100     # as root
    python boards/links/netlab.py down

Board i lives in network namespace `edgert-lnk{i}` with a veth link to this (the root) namespace:
10.79.i.2 on the board, 10.79.i.1 here. Both ends of each link are rate-limited with `tc qdisc
tbf` (kernel; this VM's kernel has no netem, see ../shared/research/boards-lab.md). Delay is added
in userspace by `DelayRelay`: a TCP relay in this namespace that holds every chunk for `delay_ms`
before forwarding it (per direction, pipelined, so it adds latency without cutting bandwidth).
Board-to-board traffic goes board A -> relay (10.79.A.1) -> board B (10.79.B.2): it crosses both
boards' links (each shaped) and the relay's delay once per direction. No IP forwarding is enabled
anywhere, and nothing touches the host's other interfaces.
"""

from __future__ import annotations

import argparse
import heapq
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

PREFIX = "edgert-lnk"


def _ip(*args: str, ns: str | None = None) -> None:
    cmd = (["ip", "netns", "exec", ns] if ns else []) + list(args)
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {r.stderr.strip()} (needs root, iproute2)")


def ns_name(i: int) -> str:
    return f"{PREFIX}{i}"


def board_addr(i: int) -> str:
    return f"10.79.{i}.2"


def host_addr(i: int) -> str:
    return f"10.79.{i}.1"


def up(n: int, rate_mbit: float | None) -> None:
    """Create n board namespaces with veth links to this namespace, tbf-limited if rate_mbit."""
    down(n)
    for i in range(n):
        ns, h, b = ns_name(i), f"elh{i}", f"elb{i}"
        _ip("ip", "netns", "add", ns)
        _ip("ip", "link", "add", h, "type", "veth", "peer", "name", b)
        _ip("ip", "link", "set", b, "netns", ns)
        _ip("ip", "addr", "add", f"{host_addr(i)}/24", "dev", h)
        _ip("ip", "link", "set", h, "up")
        _ip("ip", "addr", "add", f"{board_addr(i)}/24", "dev", b, ns=ns)
        _ip("ip", "link", "set", b, "up", ns=ns)
        _ip("ip", "link", "set", "lo", "up", ns=ns)
        if rate_mbit:
            tbf = ["tbf", "rate", f"{rate_mbit}mbit", "burst", "64kb", "latency", "100ms"]
            _ip("tc", "qdisc", "replace", "dev", h, "root", *tbf)
            _ip("tc", "qdisc", "replace", "dev", b, "root", *tbf, ns=ns)


def down(n: int = 8) -> None:
    """Delete our namespaces (their veth pairs go with them)."""
    for i in range(n):
        subprocess.run(["ip", "netns", "del", ns_name(i)], capture_output=True, check=False)


def in_namespaces() -> Callable[[str, list[str]], list[str]]:
    """A LocalCluster launcher: board{i} runs in namespace i, listening on its link address."""

    def launch(name: str, argv: list[str]) -> list[str]:
        k = int(name.removeprefix("board"))
        return ["ip", "netns", "exec", ns_name(k), *argv, "--host", board_addr(k)]

    return launch


@dataclass
class DelayRelay:
    """TCP relay that forwards each chunk `delay_ms` after it arrived, in both directions."""

    listen: tuple[str, int]
    target: tuple[str, int]
    delay_ms: float
    _srv: socket.socket | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    bytes: int = 0

    def start(self) -> tuple[str, int]:
        self._srv = socket.create_server(self.listen)
        self._srv.settimeout(0.2)
        threading.Thread(target=self._accept, daemon=True).start()
        return self._srv.getsockname()[:2]

    def _accept(self) -> None:
        assert self._srv is not None
        while not self._stop.is_set():
            try:
                a, _ = self._srv.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            b = socket.create_connection(self.target)
            for s in (a, b):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._pipe(a, b)
            self._pipe(b, a)

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        q: list[tuple[float, int, bytes]] = []
        cv = threading.Condition()
        seq = iter(range(1 << 62))

        def reader() -> None:
            while True:
                try:
                    data = src.recv(1 << 16)
                except OSError:
                    data = b""
                with cv:
                    heapq.heappush(q, (time.monotonic() + self.delay_ms / 1e3, next(seq), data))
                    cv.notify()
                if not data:
                    return

        def writer() -> None:
            while True:
                with cv:
                    while not q:
                        cv.wait()
                    due, _, data = q[0]
                    left = due - time.monotonic()
                    if left > 0:
                        cv.wait(left)
                        continue
                    heapq.heappop(q)
                if not data:
                    try:
                        dst.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
                    return
                try:
                    dst.sendall(data)
                    self.bytes += len(data)
                except OSError:
                    return

        threading.Thread(target=reader, daemon=True).start()
        threading.Thread(target=writer, daemon=True).start()

    def close(self) -> None:
        self._stop.set()
        if self._srv is not None:
            self._srv.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    u = sub.add_parser("up")
    u.add_argument("--boards", type=int, default=2)
    u.add_argument("--rate-mbit", type=float, default=None)
    d = sub.add_parser("down")
    d.add_argument("--boards", type=int, default=8)
    a = p.parse_args()
    if a.cmd == "up":
        up(a.boards, a.rate_mbit)
    else:
        down(a.boards)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
