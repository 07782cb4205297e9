"""Board profiles: what a board is (cores, memory, backends, TVM targets) and how to reach it.

Profiles are human-edited TOML files in `boards/profiles/` (read with the stdlib `tomllib`, so a
board needs nothing extra). Format (unknown keys are an error):

    name = "rk3588"                        # = the file name without .toml
    description = "Rockchip RK3588 ..."
    arch = "aarch64"                       # the board's CPU architecture (uname -m)
    memory_mib = 8192                      # physical memory
    budget_mib = 6144                      # what stages may use (the daemon refuses more)
    threads = 4                            # TVM worker threads of `edgert serve` (the big cores)

    [targets]                              # backend -> TVM target: a preset of compiler/arch.py
    cpu = "arm64"                          #   (host, arm64, mali, adreno) or a target table,
    opencl = "mali"                        #   e.g. cuda = {kind = "cuda", arch = "sm_87"}

    [[cpu_cluster]]                        # big.LITTLE: one table per cluster, fastest first
    name = "big"; cores = 4; core = "cortex-a76"; max_mhz = 2400

    [gpu]                                  # optional
    name = "Mali-G610 MP4"; api = "opencl"

    [reach]                                # how the controller reaches it
    kind = "ssh"                           # local | ssh | emulated
    host = "rk3588.local"; user = "edge"; ssh_port = 22
    port = 5555                            # the daemon's port (0: the OS picks)
    bind = "0.0.0.0"                       # the daemon's listen address

Examples
--------
>>> p = load_profile("local")                                  # doctest: +SKIP
>>> p.backends, p.budget_mib, p.reach.kind                     # doctest: +SKIP
(('cpu',), 4096, 'local')
>>> load_profile("boards/profiles/rk3588.toml").targets["opencl"]   # doctest: +SKIP
'mali'
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from edgert.errors import ConfigError

BACKENDS = ("cpu", "opencl", "cuda")
REACH_KINDS = ("local", "ssh", "emulated")
ARCHES = ("x86_64", "aarch64")
PROFILES_DIR = Path(__file__).resolve().parents[1] / "boards" / "profiles"


@dataclass(frozen=True, slots=True)
class CpuCluster:
    """One cluster of identical cores (big.LITTLE boards have two)."""

    name: str
    cores: int
    core: str = ""                 # e.g. "cortex-a76" (informational; the target sets mcpu)
    max_mhz: int | None = None


@dataclass(frozen=True, slots=True)
class Gpu:
    name: str
    api: str                       # opencl | cuda


@dataclass(frozen=True, slots=True)
class Reach:
    """How the controller reaches the board's daemon (and, for ssh, the board itself)."""

    kind: str = "local"
    host: str = "127.0.0.1"
    user: str | None = None
    ssh_port: int = 22
    port: int = 0                  # daemon port; 0 = the OS picks (printed on start)
    bind: str = "127.0.0.1"        # daemon listen address; "0.0.0.0" on a networked board
    emulator: str | None = None    # emulated boards: e.g. "qemu-aarch64-static"
    qemu_cpu: str | None = None    # emulated boards: QEMU_CPU (e.g. "cortex-a76")

    def __post_init__(self) -> None:
        if self.kind not in REACH_KINDS:
            raise ConfigError(f"reach.kind must be one of {', '.join(REACH_KINDS)}, "
                              f"got {self.kind!r}")
        if self.kind == "ssh" and not self.user:
            raise ConfigError("reach.kind = 'ssh' needs reach.user (the board's login)")
        if self.kind == "emulated" and not self.emulator:
            raise ConfigError("reach.kind = 'emulated' needs reach.emulator, e.g. "
                              "'qemu-aarch64-static'")
        for k in ("ssh_port", "port"):
            v = getattr(self, k)
            if type(v) is not int or not 0 <= v < 65536:
                raise ConfigError(f"reach.{k} must be a port number 0..65535, got {v!r}")


@dataclass(frozen=True, slots=True)
class BoardProfile:
    """One board model: resources, backends with their TVM targets, and how to reach it."""

    name: str
    arch: str
    memory_mib: int
    budget_mib: int
    threads: int
    targets: dict[str, str | dict[str, Any]]
    cpu_cluster: tuple[CpuCluster, ...]
    reach: Reach = field(default_factory=Reach)
    gpu: Gpu | None = None
    description: str = ""
    path: Path | None = None       # where it was read from

    def __post_init__(self) -> None:
        where = f"profile {self.name!r}" + (f" ({self.path})" if self.path else "")
        if self.arch not in ARCHES:
            raise ConfigError(f"{where}: arch must be one of {', '.join(ARCHES)}, "
                              f"got {self.arch!r}")
        if "cpu" not in self.targets:
            raise ConfigError(f"{where}: [targets] needs a cpu entry (every board runs stages on "
                              f"its CPU), e.g. cpu = \"arm64\"")
        for b, t in self.targets.items():
            if b not in BACKENDS:
                raise ConfigError(f"{where}: unknown backend {b!r} in [targets]; use "
                                  f"{', '.join(BACKENDS)}")
            if not (isinstance(t, str) and t) and not (isinstance(t, dict) and "kind" in t):
                raise ConfigError(f"{where}: targets.{b} must be a preset name (host, arm64, mali, "
                                  f"adreno) or a TVM target table with a 'kind', got {t!r}")
        if not self.cpu_cluster:
            raise ConfigError(f"{where}: at least one [[cpu_cluster]] is needed")
        for k in ("memory_mib", "budget_mib", "threads"):
            v = getattr(self, k)
            if type(v) is not int or v < 1:
                raise ConfigError(f"{where}: {k} must be a positive integer, got {v!r}")
        if self.budget_mib > self.memory_mib:
            raise ConfigError(f"{where}: budget_mib {self.budget_mib} exceeds memory_mib "
                              f"{self.memory_mib}; leave room for the OS")
        if self.threads > self.cores:
            raise ConfigError(f"{where}: threads {self.threads} > the {self.cores} cores of its "
                              f"cpu clusters")

    @property
    def backends(self) -> tuple[str, ...]:
        return tuple(b for b in BACKENDS if b in self.targets)

    @property
    def cores(self) -> int:
        return sum(c.cores for c in self.cpu_cluster)


def _build(cls: type, table: Any, where: str) -> Any:
    """cls(**table), rejecting unknown and missing keys with the list of valid ones."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table, got {table!r}")
    names = {f.name for f in fields(cls)} - {"path"}
    unknown = sorted(set(table) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; valid keys: "
                          f"{', '.join(sorted(names))}")
    try:
        return cls(**table)
    except TypeError as e:      # a required key is missing
        raise ConfigError(f"{where}: {e}".replace("__init__()", cls.__name__)) from None


def parse_profile(data: dict[str, Any], path: Path | None = None) -> BoardProfile:
    """A BoardProfile from a parsed TOML document (see the module docstring for the format)."""
    where = f"profile {path}" if path else "profile"
    d = dict(data)
    if not isinstance(d.get("cpu_cluster", []), list):
        raise ConfigError(f"{where}: write each CPU cluster as a [[cpu_cluster]] table")
    d["cpu_cluster"] = tuple(_build(CpuCluster, c, f"{where} [[cpu_cluster]]")
                             for c in d.get("cpu_cluster", []))
    if "reach" in d:
        d["reach"] = _build(Reach, d["reach"], f"{where} [reach]")
    if "gpu" in d:
        d["gpu"] = _build(Gpu, d["gpu"], f"{where} [gpu]")
    if not isinstance(d.get("targets", {}), dict):
        raise ConfigError(f"{where}: [targets] must map backends to TVM targets")
    d["targets"] = dict(d.get("targets", {}))
    prof = _build(BoardProfile, d, where)
    return prof if path is None else _with_path(prof, path)


def _with_path(p: BoardProfile, path: Path) -> BoardProfile:
    if p.name != path.stem:
        raise ConfigError(f"profile {path}: name {p.name!r} differs from the file name; rename "
                          f"one so they agree")
    return replace(p, path=path)


def profile_path(name_or_path: str | Path, search: Path = PROFILES_DIR) -> Path:
    """The TOML file for a profile name (looked up in `search`) or an explicit path."""
    p = Path(name_or_path)
    if p.suffix == ".toml" or p.is_file():
        if not p.is_file():
            raise ConfigError(f"board profile {p} does not exist")
        return p
    cand = search / f"{name_or_path}.toml"
    if not cand.is_file():
        raise ConfigError(f"no board profile {str(name_or_path)!r} in {search}; known: "
                          f"{', '.join(list_profiles(search)) or '(none)'}; or pass a .toml path")
    return cand


def load_profile(name_or_path: str | Path, search: Path = PROFILES_DIR) -> BoardProfile:
    """Read and validate a board profile by name (boards/profiles/NAME.toml) or path.

    Raises
    ------
    ConfigError
        The profile does not exist, is not valid TOML, or has unknown, missing or bad fields.
    """
    path = profile_path(name_or_path, search)
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"board profile {path} is not valid TOML: {e}") from None
    return parse_profile(data, path)


def list_profiles(search: Path = PROFILES_DIR) -> list[str]:
    """Names of the profiles in `search`."""
    return sorted(p.stem for p in search.glob("*.toml")) if search.is_dir() else []
