"""Memory caps for local board processes with cgroup v1 (the only mechanism that works here).

Why cgroup v1: on this VM PID 1 is not systemd (no `systemd-run -p MemoryMax`) and the memory
controller is not on the unified (v2) hierarchy; a v1 memory cgroup does work, and at its limit the
kernel's memcg OOM killer sends SIGKILL (exit 137, no Python exception): like a phone's
low-memory killer (see ../shared/research/boards-lab.md, section 3).

A `MemoryCgroup` is a child of this process's own memory cgroup (so no root of the hierarchy is
touched and the parent's own limit still applies), named uniquely per process. The board joins it
before Python starts: `wrap(cmd)` runs `sh -c 'echo $$ > cgroup.procs; exec "$@"'`, so the pid
Popen returns is the board's own and every byte it touches is charged to the cap.

Examples
--------
>>> cg = MemoryCgroup.create("board0", 256 << 20)                       # doctest: +SKIP
>>> proc = subprocess.Popen(cg.wrap([sys.executable, "-m", "edgert", ...]))  # doctest: +SKIP
>>> proc.wait(); cg.oom_report()                                        # doctest: +SKIP
'board0 hit its memory cap of 256 MiB (cgroup v1): ...'
>>> cg.close()                                                          # doctest: +SKIP
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

from edgert.errors import ConfigError

MIB = 1 << 20
V1_ROOT = Path("/sys/fs/cgroup/memory")


def _v1_path(proc_cgroup: Path, controller: str, what: str) -> str | None:
    """This process's path under the cgroup v1 `controller` hierarchy (None: not in one)."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError as e:
        raise ConfigError(f"cannot read {proc_cgroup} ({e}): {what} need Linux cgroups") from e
    return next((ln.split(":", 2)[2] for ln in lines
                 if controller in ln.split(":", 2)[1].split(",")), None)


def own_memory_cgroup(proc_cgroup: Path = Path("/proc/self/cgroup"),
                      root: Path = V1_ROOT) -> Path:
    """This process's cgroup v1 memory directory; ConfigError (with the fix) if there is none."""
    rel = _v1_path(proc_cgroup, "memory", "memory caps")
    if rel is None:
        raise ConfigError(
            "memory caps need the cgroup v1 memory controller, but this process is in no v1 "
            f"memory cgroup ({proc_cgroup} has no ':memory:' line: cgroup v2 only?). Run without "
            "mem_cap_mib, or on a host that mounts the v1 memory controller at "
            "/sys/fs/cgroup/memory")
    d = root / rel.lstrip("/")
    if not (d / "memory.limit_in_bytes").is_file():
        raise ConfigError(f"the cgroup v1 memory controller is not mounted at {d}; mount it "
                          f"(mount -t cgroup -o memory memory {root}) or run without mem_cap_mib")
    if not os.access(d, os.W_OK):
        raise ConfigError(f"cannot create memory cgroups under {d} (not writable by uid "
                          f"{os.getuid()}); run as a user that owns it, or without mem_cap_mib")
    return d


def _make_child(parent: Path, stem: str, controller: str, instead: str) -> Path:
    """mkdir a uniquely named child cgroup edgert-<pid>-<stem><random> of `parent`; a clear
    ConfigError (saying what to do `instead`) when that is not allowed."""
    path = parent / f"edgert-{os.getpid()}-{stem}{uuid.uuid4().hex[:8]}"
    try:
        path.mkdir()
    except OSError as e:
        raise ConfigError(f"cannot create the {controller} cgroup {path} ({e}); {instead} or "
                          f"fix the permissions of {parent}") from e
    return path


class MemoryCgroup:
    """One child memory cgroup with a hard limit (see the module docstring)."""

    def __init__(self, path: Path, name: str, limit_bytes: int) -> None:
        self.path, self.name, self.limit_bytes = path, name, limit_bytes

    @classmethod
    def create(cls, name: str, limit_bytes: int, parent: Path | None = None) -> MemoryCgroup:
        """mkdir a uniquely named child cgroup and set its memory (and memory+swap) limit."""
        if type(limit_bytes) is not int or limit_bytes < 4 * MIB:
            raise ConfigError(f"memory cap for {name} must be an integer >= 4 MiB of bytes, got "
                              f"{limit_bytes!r}")
        path = _make_child(parent or own_memory_cgroup(), f"{name}-", "memory",
                           "run without mem_cap_mib")
        cg = cls(path, name, limit_bytes)
        try:
            cg._write("memory.limit_in_bytes", limit_bytes)
        except OSError as e:
            cg.close()
            raise ConfigError(f"cannot set {path}/memory.limit_in_bytes to {limit_bytes} ({e}); "
                              f"is the cap below what the cgroup already uses?") from e
        if (path / "memory.memsw.limit_in_bytes").exists():
            try:   # with swap, a capped board would page out instead of being killed
                cg._write("memory.memsw.limit_in_bytes", limit_bytes)
            except OSError:
                pass  # swap accounting off: nothing to cap
        return cg

    # -- membership
    def wrap(self, cmd: list[str]) -> list[str]:
        """`cmd` made to join this cgroup before it starts (its pid stays the command's pid)."""
        procs = str(self.path / "cgroup.procs")
        return ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', procs, *cmd]

    def add(self, pid: int) -> None:
        """Move a running process in (its memory so far stays charged where it was)."""
        self._write("cgroup.procs", pid)

    def pids(self) -> list[int]:
        try:
            return [int(x) for x in (self.path / "cgroup.procs").read_text().split()]
        except OSError:
            return []

    # -- accounting
    def _read_int(self, f: str) -> int:
        return int((self.path / f).read_text().split()[0])

    def _write(self, f: str, value: int) -> None:
        (self.path / f).write_text(f"{value}\n")

    def usage(self) -> int:
        return self._read_int("memory.usage_in_bytes")

    def max_usage(self) -> int:
        """Bytes: the high-water mark of everything charged (RSS and page cache)."""
        return self._read_int("memory.max_usage_in_bytes")

    def failcnt(self) -> int:
        """How many times a charge hit the limit (reclaim, and if that failed, OOM)."""
        return self._read_int("memory.failcnt")

    def oom_control(self) -> dict[str, int]:
        """{oom_kill_disable, under_oom, oom_kill (processes killed at the cap)}."""
        out = {}
        for ln in (self.path / "memory.oom_control").read_text().splitlines():
            k, _, v = ln.partition(" ")
            out[k] = int(v)
        return out

    def report(self) -> dict[str, int]:
        try:
            return {"limit": self.limit_bytes, "max_usage": self.max_usage(),
                    "failcnt": self.failcnt(), "oom_kill": self.oom_control().get("oom_kill", 0)}
        except OSError:
            return {"limit": self.limit_bytes, "max_usage": -1, "failcnt": -1, "oom_kill": -1}

    def oom_report(self) -> str | None:
        """A sentence naming the cap and the overshoot if a process was OOM-killed, else None."""
        r = self.report()
        if r["oom_kill"] <= 0:
            return None
        return (f"{self.name} hit its memory cap of {self.limit_bytes / MIB:.0f} MiB (cgroup v1, "
                f"{self.path.name}): charged up to {r['max_usage'] / MIB:.0f} MiB, it needed more "
                f"and the kernel killed it (SIGKILL; memory.oom_control oom_kill "
                f"{r['oom_kill']}): its working set is larger than the cap. Raise "
                f"mem_cap_mib, or give this board a smaller stage (fewer layers, fewer "
                f"micro-batches in flight)")

    def close(self, timeout: float = 5.0) -> None:
        """Remove the cgroup once its processes have exited (idempotent)."""
        deadline = time.monotonic() + timeout
        while self.path.exists():
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:      # EBUSY while a member is still exiting
                if time.monotonic() > deadline:
                    raise ConfigError(f"cannot remove {self.path}: processes {self.pids()} are "
                                      f"still in it; kill them and rmdir it") from None
                time.sleep(0.05)


# ---- CPU quotas ---------------------------------------------------------------------------------

CPU_V1_ROOT = Path("/sys/fs/cgroup/cpu")
CPU_PERIOD_US = 10_000     # short CFS periods: a 25% cap then means 2.5 ms of every 10 ms, not
                           # 25 ms bursts followed by 75 ms stalls (steps here last tens of ms)


def own_cpu_cgroup(proc_cgroup: Path = Path("/proc/self/cgroup"),
                   root: Path = CPU_V1_ROOT) -> Path:
    """This process's cgroup v1 cpu directory; ConfigError (with the fix) if there is none."""
    rel = _v1_path(proc_cgroup, "cpu", "CPU caps")
    if rel is None:
        raise ConfigError(
            f"CPU caps need the cgroup v1 cpu controller, but {proc_cgroup} has no ':cpu:' line "
            "(cgroup v2 only?); run without a CPU cap, or on a host that mounts the v1 cpu "
            "controller at /sys/fs/cgroup/cpu")
    d = root / rel.lstrip("/")
    if not (d / "cpu.cfs_quota_us").is_file():
        raise ConfigError(f"the cgroup v1 cpu controller is not mounted at {d} (no "
                          f"cpu.cfs_quota_us); mount it (mount -t cgroup -o cpu cpu {root}) or "
                          f"run without a CPU cap")
    return d


class CpuCap:
    """One child cpu cgroup whose processes together get at most `fraction` of one core.

    `fraction` is of a single CPU (0.25 = a quarter of one core; 2.0 = two cores); the kernel's CFS
    bandwidth control enforces it as `cpu.cfs_quota_us` per `cpu.cfs_period_us`. Pin a capped
    board to one core (LocalCluster.pin) so "a quarter of the speed" means a quarter of that core.

    Examples
    --------
    >>> cap = CpuCap.create("board1", 0.25)          # doctest: +SKIP
    >>> cap.add(board_pid); cap.set(0.5); cap.close()  # doctest: +SKIP
    """

    def __init__(self, path: Path, name: str, fraction: float, period_us: int) -> None:
        self.path, self.name, self.fraction, self.period_us = path, name, fraction, period_us

    @classmethod
    def create(cls, name: str, fraction: float, parent: Path | None = None,
               period_us: int = CPU_PERIOD_US) -> CpuCap:
        path = _make_child(parent or own_cpu_cgroup(), f"{name}-cpu-", "cpu",
                           "run without a CPU cap")
        cap = cls(path, name, fraction, period_us)
        try:
            (path / "cpu.cfs_period_us").write_text(f"{period_us}\n")
            cap.set(fraction)
        except BaseException:
            cap.close()
            raise
        return cap

    @staticmethod
    def quota_us(fraction: float, period_us: int) -> int:
        """CFS quota for `fraction` of a core (the kernel's minimum is 1000 us)."""
        if isinstance(fraction, bool) or not isinstance(fraction, int | float) or fraction <= 0:
            raise ConfigError(f"a CPU cap is a fraction of one core > 0 (0.25 = a quarter), got "
                              f"{fraction!r}")
        q = round(fraction * period_us)
        if q < 1000:
            raise ConfigError(f"a CPU cap of {fraction} x {period_us} us periods is {q} us, below "
                              f"the kernel's 1000 us minimum quota; raise the fraction or the "
                              f"period")
        return q

    def set(self, fraction: float) -> None:
        """Change the cap of the running members (takes effect within one period)."""
        q = self.quota_us(fraction, self.period_us)
        (self.path / "cpu.cfs_quota_us").write_text(f"{q}\n")
        self.fraction = fraction

    def add(self, pid: int) -> None:
        """Move a running process and all its threads in (cgroup.procs moves the thread group)."""
        (self.path / "cgroup.procs").write_text(f"{pid}\n")

    def pids(self) -> list[int]:
        try:
            return [int(x) for x in (self.path / "cgroup.procs").read_text().split()]
        except OSError:
            return []

    def stat(self) -> dict[str, int]:
        """cpu.stat: nr_periods, nr_throttled, throttled_time (ns)."""
        out = {}
        for ln in (self.path / "cpu.stat").read_text().splitlines():
            k, _, v = ln.partition(" ")
            out[k] = int(v)
        return out

    def close(self, timeout: float = 5.0) -> None:
        """Move remaining members back to the parent and remove the cgroup (idempotent)."""
        if not self.path.exists():
            return
        for pid in self.pids():
            try:
                (self.path.parent / "cgroup.procs").write_text(f"{pid}\n")
            except OSError:
                pass           # exited meanwhile
        MemoryCgroup.close(self, timeout)  # type: ignore[arg-type]  # same rmdir-until-empty loop
