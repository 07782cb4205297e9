"""`python -m edgert`: the board's commands (TVM's runtime only; never the compiler or control).

    python -m edgert serve --name board0 --port 5555 --keys keys --budget-mib 2048
    python -m edgert serve --name board0 --keys keys --board rk3588   # settings from a profile
    python -m edgert probe                       # which backends this board can really use
    python -m edgert keys --out keys --boards board0,board1          # CURVE keys for a cluster

The host's commands (train, compile, run, ...) live in control/cli/. The `edgert` console script
(control.cli:main) offers every command, these three included (`edgert serve ...`); on a board,
where only this package is installed, `python -m edgert` offers these three and says where the
others run.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from edgert.errors import ConfigError, EdgeError

# The controller's commands (control/cli/): named here only to say where they run.
HOST_COMMANDS = ("train", "fwdgrad", "compile", "grads", "tune", "plan", "run", "resume", "lm")


# ---- keys ---------------------------------------------------------------------------------------
def cmd_keys(a: argparse.Namespace) -> int:
    from edgert.transport import generate_keys

    ring = generate_keys(a.out, [b for b in a.boards.split(",") if b])
    print(f"keys in {ring.root}: copy public/ to every machine, private/<name>.key_secret to "
          f"that machine only")
    return 0


def keys_parser(sub: argparse._SubParsersAction) -> None:
    k = sub.add_parser("keys", help="create a cluster's CURVE keypairs (controller + boards)")
    k.add_argument("--out", type=Path, required=True)
    k.add_argument("--boards", required=True, help="comma-separated board names")
    k.set_defaults(func=cmd_keys)


# ---- serve --------------------------------------------------------------------------------------
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


def serve_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("serve", help="run the board daemon (TVM runtime only)")
    s.add_argument("--name", required=True, help="this board's name (= its key name)")
    s.add_argument("--board", default=None,
                   help="board profile (name in boards/profiles or a .toml path): its budget, "
                        "threads, listen address and port are the defaults")
    s.add_argument("--host", default=None, help="listen address (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=None,
                   help="0 (default): the OS picks; printed on start")
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


# ---- probe --------------------------------------------------------------------------------------
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


def probe_parser(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser("probe", help="which backends (cpu, opencl, cuda) this board can really use")
    b.add_argument("--backends", default="cpu,opencl,cuda",
                   help="the wish list to resolve (a board profile's backends)")
    b.add_argument("--json", action="store_true", help="the full probe report as JSON")
    b.set_defaults(func=cmd_probe)


BOARD_COMMANDS: dict[str, Callable[[argparse._SubParsersAction], None]] = {
    "serve": serve_parser, "probe": probe_parser, "keys": keys_parser}


# ---- the command line ---------------------------------------------------------------------------
def new_parser(description: str) -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    """The `edgert` parser with its global flags; commands are added to the returned subparsers."""
    p = argparse.ArgumentParser(prog="edgert", description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p, p.add_subparsers(dest="command", required=True)


def build_parser() -> argparse.ArgumentParser:
    p, sub = new_parser(__doc__)
    for register in BOARD_COMMANDS.values():
        register(sub)
    return p


def run(args: argparse.Namespace) -> int:
    """Run a parsed command: logging from -v / EDGERT_LOG, errors as `edgert: error: ...`
    (exit 2), Ctrl-C as exit 130."""
    debug = args.verbose or os.environ.get("EDGERT_LOG") == "debug"
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except EdgeError as e:
        print(f"edgert: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("edgert: interrupted", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cmd = next((x for x in argv if not x.startswith("-")), None)
    if cmd in HOST_COMMANDS:
        print(f"edgert: {cmd!r} is a host command: it needs the compiler and the controller "
              f"(control/), which a board does not have. Run it on the controller machine: "
              f"`edgert {cmd} ...` (the console script) or `python -m control {cmd} ...`. "
              f"Board commands: {', '.join(BOARD_COMMANDS)}", file=sys.stderr)
        return 2
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
