"""Message transport: the `Transport` Protocol, ZeroMQ over CURVE (`ZmqTransport`), and an
in-process fake (`InprocTransport`) for tests.

Topology. Every board binds one ROUTER socket. Whoever talks to a board (the controller, the
neighbouring boards) connects a DEALER socket to it under a logical peer name, e.g. "stage1".
`recv` returns `(peer, Message)`: `peer` is the ROUTER identity (bytes) of a client that wrote to
our ROUTER, or the name (str) of our DEALER connection that got a reply. `send(peer, msg)` takes
either kind of id; replies to a client go back through the ROUTER under its identity. ROUTER
identity frames are added and stripped here and nowhere else. A board may also bind one PUB
socket (`bind_pub`/`publish`) for push telemetry; controllers read it with `subscriber` (SUB).

Security. With `keys` given, every socket speaks CURVE: the ROUTER is a CURVE server with the
board's secret key, and a ZAP authenticator thread admits only clients whose public key is in the
cluster's `public/` directory (the controller's and the boards'). A client with another key, or
without CURVE, never completes the handshake: it gets no reply at all and cannot deploy anything.
`generate_keys` makes the directory:

    keys/public/controller.key  keys/public/<board>.key           (z85 public keys, shareable)
    keys/private/controller.key_secret  keys/private/<board>.key_secret   (one per machine)

Limits. ZMQ_MAXMSGSIZE on every socket drops a peer that sends a frame larger than
`max_msg_bytes` (libzmq closes that connection; others are unaffected). Smaller, but still
oversized or malformed, frames reach `decode`, and `recv` raises `FrameError` naming the peer, so
the board can answer with an ERROR and keep serving.
"""

from __future__ import annotations

import logging
import queue
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import zmq

from edgert.errors import ConfigError, ProtocolError, TransportError
from edgert.protocol import DEFAULT_MAX_TENSOR_BYTES, Message, decode, encode

log = logging.getLogger(__name__)

Peer = bytes | str          # ROUTER identity of a client, or the name of one of our DEALERs
CONTROLLER = "controller"
DEFAULT_MAX_MSG_BYTES = DEFAULT_MAX_TENSOR_BYTES + (1 << 20)   # bytes per frame


class FrameError(ProtocolError):
    """Frames from `peer` did not decode; the receiver should reply ERROR and carry on."""

    def __init__(self, peer: Peer, cause: ProtocolError) -> None:
        super().__init__(str(cause))
        self.peer = peer
        self.cause = cause


class Transport(Protocol):
    """What the board loop and the controller need from a link layer."""

    def send(self, peer: Peer, msg: Message) -> None: ...

    def recv(self, timeout: float | None) -> tuple[Peer, Message] | None:
        """Next message from anyone, or None after `timeout` seconds (None = wait forever)."""
        ...

    def connect(self, name: str, addr: str, server: str | None = None) -> None:
        """Open a DEALER link to `addr` under the peer name `name` (`server`: its key name)."""
        ...

    def close(self) -> None: ...


# ---- keys ---------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class KeyRing:
    """Where a cluster's CURVE keys live; see the module docstring for the layout."""

    root: Path

    @property
    def public_dir(self) -> Path:
        return self.root / "public"

    def public(self, name: str) -> bytes:
        return self._load(self.public_dir / f"{name}.key")[0]

    def secret(self, name: str) -> tuple[bytes, bytes]:
        """(public, secret) z85 keys of `name`; needs this machine's private key file."""
        path = self.root / "private" / f"{name}.key_secret"
        pub, sec = self._load(path)
        if sec is None:
            raise ConfigError(f"{path} holds no secret key; regenerate with `edgert keys`")
        return pub, sec

    @staticmethod
    def _load(path: Path) -> tuple[bytes, bytes | None]:
        import zmq.auth

        if not path.is_file():
            raise ConfigError(
                f"CURVE key file {path} is missing; create the cluster's keys with "
                f"`edgert keys --out {path.parent.parent} --boards NAME,...` and copy them here")
        try:
            return zmq.auth.load_certificate(str(path))
        except (OSError, ValueError) as e:
            raise ConfigError(f"{path} is not a ZeroMQ certificate ({e}); regenerate it") from e


def generate_keys(root: Path | str, boards: list[str]) -> KeyRing:
    """Write keypairs for the controller and each board under `root` (see module docstring)."""
    import zmq.auth

    root = Path(root)
    pub, priv = root / "public", root / "private"
    pub.mkdir(parents=True, exist_ok=True)
    priv.mkdir(parents=True, exist_ok=True)
    priv.chmod(0o700)
    for name in [CONTROLLER, *boards]:
        if not name.isidentifier():
            raise ConfigError(f"key name {name!r} must be a plain identifier (letters, digits, _)")
        zmq.auth.create_certificates(str(priv), name)
        shutil.move(str(priv / f"{name}.key"), str(pub / f"{name}.key"))
        (priv / f"{name}.key_secret").chmod(0o600)
    return KeyRing(root)


# ---- ZeroMQ -------------------------------------------------------------------------------------

class ZmqTransport:
    """One optional bound ROUTER plus named DEALER links; all sockets CURVE when `keys` given.

    Examples
    --------
    >>> t = ZmqTransport("stage0", keys=KeyRing(Path("keys")))          # doctest: +SKIP
    >>> port = t.bind("tcp://127.0.0.1:0")                               # doctest: +SKIP
    """

    def __init__(self, name: str, *, keys: KeyRing | None = None,
                 max_msg_bytes: int = DEFAULT_MAX_MSG_BYTES,
                 max_tensor_bytes: int = DEFAULT_MAX_TENSOR_BYTES,
                 key_name: str | None = None) -> None:
        self.name = name                            # also our identity on peers' ROUTERs
        self.keys = keys
        self.max_msg_bytes = max_msg_bytes          # bytes per frame, enforced by libzmq
        self.max_tensor_bytes = max_tensor_bytes    # bytes per tensor, enforced by decode
        self._ctx = zmq.Context()
        self._router: zmq.Socket | None = None
        self._dealers: dict[str, zmq.Socket] = {}
        self._addrs: dict[str, str] = {}
        self._poller = zmq.Poller()
        self._auth = None
        self._pub: zmq.Socket | None = None        # telemetry PUB (bind_pub)
        # Two clients with one key (the controller and a probe) need distinct identities.
        self._curve = keys.secret(key_name or name) if keys is not None else None

    # -- setup
    def bind(self, addr: str = "tcp://127.0.0.1:0") -> str:
        """Bind the ROUTER; returns the actual endpoint (the OS picks the port for ':0')."""
        if self._router is not None:
            raise TransportError(f"{self.name}: already bound to {self.endpoint}")
        if self.keys is not None:
            # The ZAP handler must run before the first connection, or libzmq admits any key.
            from zmq.auth.thread import ThreadAuthenticator

            self._auth = ThreadAuthenticator(self._ctx, log=logging.getLogger(f"{__name__}.zap"))
            self._auth.start()
            self._auth.configure_curve(domain="*", location=str(self.keys.public_dir))
        s = self._socket(zmq.ROUTER)
        if self._curve is not None:
            s.curve_publickey, s.curve_secretkey = self._curve
            s.curve_server = True
        s.setsockopt(zmq.ROUTER_MANDATORY, 1)   # sending to a gone client raises, not drops
        s.setsockopt(zmq.ROUTER_HANDOVER, 1)    # a peer that reconnects keeps its identity
        try:
            s.bind(addr)
        except zmq.ZMQError as e:
            s.close(0)
            raise TransportError(f"{self.name}: cannot bind {addr} ({e}); pick a free port") from e
        self._router = s
        self._poller.register(s, zmq.POLLIN)
        return self.endpoint

    def bind_pub(self, addr: str = "tcp://127.0.0.1:0") -> str:
        """Bind the telemetry PUB socket; returns its endpoint. Call after `bind`.

        With keys it is a CURVE server with this board's key, admitted by the same ZAP handler as
        the ROUTER: only the cluster's keys can subscribe. A slow subscriber loses old records
        (PUB drops at its high-water mark) and never slows the board down.
        """
        if self._router is None:
            raise TransportError(f"{self.name}: bind() the ROUTER before bind_pub() (the ZAP "
                                 f"handler that admits subscribers starts there)")
        if self._pub is not None:
            raise TransportError(f"{self.name}: telemetry already bound to {self.pub_endpoint}")
        s = self._ctx.socket(zmq.PUB)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SNDHWM, 100)           # records; older ones are dropped, not queued
        if self._curve is not None:
            s.curve_publickey, s.curve_secretkey = self._curve
            s.curve_server = True
        try:
            s.bind(addr)
        except zmq.ZMQError as e:
            s.close(0)
            raise TransportError(f"{self.name}: cannot bind telemetry {addr} ({e}); pick a "
                                 f"free port") from e
        self._pub = s
        return s.getsockopt_string(zmq.LAST_ENDPOINT)

    @property
    def pub_endpoint(self) -> str | None:
        """The telemetry PUB endpoint, or None if `bind_pub` was not called."""
        return None if self._pub is None else self._pub.getsockopt_string(zmq.LAST_ENDPOINT)

    def publish(self, msg: Message) -> None:
        """Send one message to every telemetry subscriber (none: dropped); never blocks."""
        if self._pub is None:
            return
        try:
            self._pub.send_multipart(encode(msg), flags=zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as e:           # a full queue drops the record: telemetry is lossy
            log.debug("%s: telemetry record dropped (%s)", self.name, e)

    @property
    def endpoint(self) -> str:
        if self._router is None:
            raise TransportError(f"{self.name}: not bound")
        return self._router.getsockopt_string(zmq.LAST_ENDPOINT)

    def connect(self, name: str, addr: str, server: str | None = None) -> None:
        """DEALER to `addr`; `server` names the key of the board there (default: `name`)."""
        if name in self._dealers:
            if self._addrs.get(name) == addr:
                return                      # keep the live link (and its queued messages)
            self.disconnect(name)
        s = self._socket(zmq.DEALER)
        s.setsockopt(zmq.IDENTITY, self.name.encode())
        if self._curve is not None and self.keys is not None:
            s.curve_publickey, s.curve_secretkey = self._curve
            s.curve_serverkey = self.keys.public(server or name)
        s.connect(addr)
        self._dealers[name] = s
        self._addrs[name] = addr
        self._poller.register(s, zmq.POLLIN)

    def disconnect(self, name: str) -> None:
        s = self._dealers.pop(name, None)
        self._addrs.pop(name, None)
        if s is not None:
            self._poller.unregister(s)
            s.close(0)

    def _socket(self, kind: int) -> zmq.Socket:
        s = self._ctx.socket(kind)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.MAXMSGSIZE, self.max_msg_bytes)
        s.setsockopt(zmq.SNDHWM, 0)     # a pipeline step's messages are bounded by the schedule
        s.setsockopt(zmq.RCVHWM, 0)
        return s

    # -- I/O
    def send(self, peer: Peer, msg: Message) -> None:
        frames = encode(msg)
        try:
            if isinstance(peer, str):
                sock = self._dealers.get(peer)
                if sock is None:
                    raise TransportError(f"{self.name}: no link named {peer!r}; connect() first")
                sock.send_multipart(frames, copy=False)
            else:
                if self._router is None:
                    raise TransportError(f"{self.name}: cannot reply to {peer!r}, not bound")
                self._router.send_multipart([peer, *frames], copy=False)
        except zmq.ZMQError as e:
            raise TransportError(f"{self.name}: send {msg.kind.value} to {peer!r} failed ({e}); "
                                 f"the peer has gone") from e

    def recv(self, timeout: float | None) -> tuple[Peer, Message] | None:
        ms = None if timeout is None else max(0, int(timeout * 1000))
        events = dict(self._poller.poll(ms))
        if not events:
            return None
        if self._router is not None and self._router in events:
            frames = self._router.recv_multipart(copy=False)
            peer: Peer = bytes(frames[0].buffer)
            body = frames[1:]
        else:
            name, sock = next((n, s) for n, s in self._dealers.items() if s in events)
            peer, body = name, sock.recv_multipart(copy=False)
        try:
            return peer, decode([f.buffer for f in body], max_tensor_bytes=self.max_tensor_bytes)
        except ProtocolError as e:
            raise FrameError(peer, e) from e

    def send_raw(self, peer: str, frames: list[bytes]) -> None:
        """Send arbitrary frames on a DEALER link (fault-injection tests only)."""
        self._dealers[peer].send_multipart(frames)

    def close(self) -> None:
        for name in list(self._dealers):
            self.disconnect(name)
        if self._router is not None:
            self._poller.unregister(self._router)
            self._router.close(0)
            self._router = None
        if self._pub is not None:
            self._pub.close(0)
            self._pub = None
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        self._ctx.term()


# ---- in-process fake ----------------------------------------------------------------------------

class InprocHub:
    """The 'network' of InprocTransports: one queue per endpoint name."""

    def __init__(self) -> None:
        self.queues: dict[str, queue.SimpleQueue[tuple[str, list[bytes]]]] = {}

    def endpoint(self, name: str) -> InprocTransport:
        self.queues.setdefault(name, queue.SimpleQueue())
        return InprocTransport(name, self)


class InprocTransport:
    """Delivers messages between endpoints of one hub, through encode/decode (copied bytes).

    Peer ids are endpoint names; `connect(name, addr)` aliases `name` to endpoint `addr`.
    """

    def __init__(self, name: str, hub: InprocHub) -> None:
        self.name = name
        self._hub = hub
        self._links: dict[str, str] = {}

    def connect(self, name: str, addr: str, server: str | None = None) -> None:
        self._links[name] = addr

    def send(self, peer: Peer, msg: Message) -> None:
        dest = peer.decode() if isinstance(peer, bytes) else self._links.get(peer, peer)
        q = self._hub.queues.get(dest)
        if q is None:
            raise TransportError(f"{self.name}: no endpoint {dest!r} on this hub")
        q.put((self.name, [bytes(f) for f in encode(msg)]))

    def recv(self, timeout: float | None) -> tuple[Peer, Message] | None:
        try:
            sender, frames = self._hub.queues[self.name].get(
                block=timeout is None or timeout > 0, timeout=timeout or None)
        except queue.Empty:
            return None
        return sender.encode(), decode(frames)

    def pending(self) -> int:
        return self._hub.queues[self.name].qsize()

    def close(self) -> None:
        pass


def subscriber(ctx: zmq.Context, addr: str, keys: KeyRing | None, server: str,
               key_name: str = CONTROLLER) -> zmq.Socket:
    """A SUB socket on a board's telemetry endpoint (CURVE client with `key_name`'s key when
    `keys` is given; `server`: the board's key name). Subscribed to everything."""
    s = ctx.socket(zmq.SUB)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.RCVHWM, 1000)
    if keys is not None:
        s.curve_publickey, s.curve_secretkey = keys.secret(key_name)
        s.curve_serverkey = keys.public(server)
    s.setsockopt(zmq.SUBSCRIBE, b"")
    s.connect(addr)
    return s


def peer_addresses(peers: Mapping[str, str]) -> dict[str, str]:
    """Validate a {name: endpoint} map from a LOAD body."""
    out = {}
    for name, addr in peers.items():
        if not isinstance(name, str) or not isinstance(addr, str) or "://" not in addr:
            raise ConfigError(f"peer {name!r} -> {addr!r}: expected a name and an endpoint such "
                              f"as tcp://10.0.0.2:5555")
        out[name] = addr
    return out
