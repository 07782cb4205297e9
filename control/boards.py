"""Host-side helpers for board profiles: the emulated aarch64 board (qemu-user) and its rootfs.

The emulated board is an `edgert serve` process of an arm64 Python 3.11 run by qemu-user on this
machine: `boards/emulated/make_rootfs.sh` builds its root filesystem once (Debian .debs unpacked +
aarch64 wheels, cached in ~/.cache/edgert/arm64-rootfs), and `qemu_launcher` turns LocalCluster's
board command into the emulated one for the boards it names (see docs/boards.md).

Examples
--------
>>> from control.cluster import LocalCluster                         # doctest: +SKIP
>>> from edgert.profile import load_profile                         # doctest: +SKIP
>>> launch = profile_launcher({"board1": load_profile("qemu-a76")})  # doctest: +SKIP
>>> with LocalCluster(2, launcher=launch, start_timeout=300) as c:  # doctest: +SKIP
...     c.deploy(["build/x86/stage0", "build/arm64/stage1"], micro_batches=2)
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

from edgert.errors import ConfigError
from edgert.profile import BoardProfile

REPO = Path(__file__).resolve().parents[1]
MAKE_ROOTFS = REPO / "boards" / "emulated" / "make_rootfs.sh"
SITE = "opt/edgert-site"                  # the aarch64 wheels, inside the rootfs


def default_rootfs() -> Path:
    return Path(os.environ.get("EDGERT_ARM64_ROOT") or
                Path.home() / ".cache" / "edgert" / "arm64-rootfs")


def arm64_rootfs(root: Path | None = None, build: bool = True) -> Path:
    """The emulated board's root filesystem, built by make_rootfs.sh if missing or outdated.

    Raises
    ------
    ConfigError
        qemu-aarch64-static is missing, or the build failed (its log is in the message).
    """
    root = Path(root or default_rootfs())
    if shutil.which("qemu-aarch64-static") is None:
        raise ConfigError("qemu-aarch64-static is not installed: run scripts/setup.sh (as root) "
                          "or apt-get install qemu-user-static")
    if not build:
        if not (root / ".edgert-rootfs-stamp").is_file():
            raise ConfigError(f"no arm64 rootfs in {root}: run boards/emulated/make_rootfs.sh")
        return root
    r = subprocess.run(["bash", str(MAKE_ROOTFS), str(root)], capture_output=True, text=True,
                       check=False)
    if r.returncode != 0:
        raise ConfigError(f"boards/emulated/make_rootfs.sh failed (exit {r.returncode}):\n"
                          f"{r.stderr[-3000:]}")
    return root


def qemu_command(rootfs: Path, argv: list[str], *, qemu_cpu: str = "cortex-a76",
                 src: Path = REPO, emulator: str = "qemu-aarch64-static") -> list[str]:
    """`python ARGS...` (argv[0] is a Python) as an emulated aarch64 process in a clean env.

    `env -i`: the host's PIP_*/PYTHON* variables must not leak into the board; QEMU_CPU=cortex-a76
    keeps OpenBLAS off its SME kernels (15 s f64 matmuls, bogus FP warnings under qemu's `max`).
    """
    # QEMU_LD_PREFIX (= -L) is inherited: an aarch64 child (the backend probe), started through
    # binfmt_misc (make_rootfs.sh registers it), finds the rootfs's libraries too.
    env = [f"QEMU_CPU={qemu_cpu}", f"QEMU_LD_PREFIX={rootfs}", f"PYTHONPATH={rootfs / SITE}:{src}",
           "PYTHONNOUSERSITE=1",
           "HOME=/tmp", "LANG=C.UTF-8"]
    if os.environ.get("EDGERT_LOG"):
        env.append(f"EDGERT_LOG={os.environ['EDGERT_LOG']}")
    return ["env", "-i", *env, emulator, "-L", str(rootfs),
            str(rootfs / "usr/bin/python3.11"), *argv[1:]]


def qemu_launcher(rootfs: Path, names: Collection[str], *, qemu_cpu: str = "cortex-a76",
                  src: Path = REPO) -> Callable[[str, list[str]], list[str]]:
    """A LocalCluster launcher that runs the boards in `names` emulated, the others natively."""
    wanted = set(names)

    def launch(name: str, argv: list[str]) -> list[str]:
        return qemu_command(rootfs, argv, qemu_cpu=qemu_cpu, src=src) if name in wanted else argv

    return launch


def profile_launcher(profiles: dict[str, BoardProfile], rootfs: Path | None = None
                     ) -> Callable[[str, list[str]], list[str]]:
    """A LocalCluster launcher from board profiles: emulated ones under qemu, local ones as is.

    Each board's daemon also gets `--board PROFILE` (its budget and threads, unless LocalCluster
    passes its own)."""
    emulated = {n: p for n, p in profiles.items() if p.reach.kind == "emulated"}
    for n, p in profiles.items():
        if p.reach.kind == "ssh":
            raise ConfigError(f"board {n} (profile {p.name}) is reached over ssh: provision it "
                              f"with boards/provision.sh, it cannot be started locally")
    root = arm64_rootfs(rootfs) if emulated else Path()

    def launch(name: str, argv: list[str]) -> list[str]:
        p = profiles.get(name)
        if p is None:
            return argv
        argv = [*argv, "--board", str(p.path or p.name)]
        if p.reach.kind != "emulated":
            return argv
        return qemu_command(root, argv, qemu_cpu=p.reach.qemu_cpu or "cortex-a76",
                            emulator=p.reach.emulator or "qemu-aarch64-static")

    return launch


def tvm_target(spec: str | dict[str, Any]):    # -> tvm.target.Target (tvm imported lazily)
    """A profile's target entry as a TVM target: a preset of compiler/arch.py or a target table.

    A table may carry its CPU side under "host" (GPU targets), as in TVM's own target JSON.
    """
    import tvm

    from compiler.arch import get_arch

    if isinstance(spec, str):
        return get_arch(spec).tvm_target()
    d = dict(spec)
    host = d.pop("host", None)
    try:
        return tvm.target.Target(d, host=host) if host else tvm.target.Target(d)
    except Exception as e:  # noqa: BLE001 - TVM raises its own error types
        raise ConfigError(f"TVM rejects the target {spec!r}: {e}") from None
