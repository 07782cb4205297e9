"""Train on boards that are already running: attach to the daemons of a board registry.

`boards/provision.sh --start` starts `edgert serve` on a real board and records its endpoint in
the cluster's registry (`KEYS/boards.json`:
{name: {"endpoint": "tcp://HOST:PORT", "profile", ...}}).
`AttachedCluster` is a `control.controller.BoardCluster` whose boards come from that registry
instead of being spawned here (control/cluster.py); deploy, train_step, train_async, params,
load_state ... are the same code, so every job that takes a cluster can run on provisioned boards:

    edgert train --registry keys/boards.json [--boards-named rk0,pi0]

Differences from local boards: a remote board's death is seen as a request timeout (`timeout`;
there is no local process to poll), `close()` leaves the daemons running (they keep serving other
jobs; a new deploy replaces what this job loaded), and `pin` / `throttle` need a local process.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from control.controller import BoardCluster, BoardHandle
from edgert.errors import BoardError, ConfigError
from edgert.transport import CONTROLLER, KeyRing

log = logging.getLogger(__name__)


class _Remote:
    """Stands in for the Popen of a board this controller did not start."""

    pid = None
    stdout = None
    returncode = None

    def poll(self) -> None:
        return None

    def kill(self) -> None:
        pass

    def wait(self, timeout: float | None = None) -> None:
        return None


def read_registry(path: str | Path, names: list[str] | None = None) -> dict[str, str]:
    """{board name: endpoint} from a registry file, in registry order or in `names`' order.

    Examples
    --------
    >>> read_registry("keys/boards.json", ["rk0", "pi0"])     # doctest: +SKIP
    {'rk0': 'tcp://10.0.0.5:7700', 'pi0': 'tcp://10.0.0.6:7700'}
    """
    path = Path(path)
    how = ("boards/provision.sh --start writes it (docs/boards.md), or write "
           '{"board0": {"endpoint": "tcp://HOST:PORT"}}')
    try:
        reg = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"board registry {path} does not exist: {how}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"board registry {path} is not readable JSON ({e}): {how}") from None
    if not isinstance(reg, dict) or not reg:
        raise ConfigError(f"board registry {path} holds no boards: {how}")
    out = {}
    for name in names or list(reg):
        entry = reg.get(name)
        if entry is None:
            raise ConfigError(f"board {name!r} is not in {path}; it has {sorted(reg)}")
        ep = entry.get("endpoint") if isinstance(entry, dict) else None
        if not isinstance(ep, str) or not ep.startswith("tcp://") or ep.count(":") != 2:
            raise ConfigError(f"board {name!r} in {path} has no endpoint of the form "
                              f"tcp://HOST:PORT (got {ep!r}): {how}")
        out[name] = ep
    return out


class AttachedCluster(BoardCluster):
    """A cluster of running board daemons listed in a registry (see the module docstring).

    Parameters
    ----------
    registry : path
        The registry JSON (`KEYS/boards.json`).
    names : list of str, optional
        The boards to use, in pipeline order (default: all, in registry order).
    keys : path, optional
        The cluster's key directory (`edgert keys --out`); default: the registry's folder. The
        controller's secret key and every board's public key must be there.
    timeout, start_timeout : float
        Seconds per request; seconds for each board's first answer (HELLO).

    Examples
    --------
    >>> with AttachedCluster("keys/boards.json", ["rk0", "pi0"]) as c:   # doctest: +SKIP
    ...     c.deploy(["build/stage0", "build/stage1"], micro_batches=2)
    ...     loss = c.train_step([batch0, batch1], OptimConfig(lr=1e-4))
    """

    def __init__(self, registry: str | Path, names: list[str] | None = None, *,
                 keys: str | Path | None = None, run_seed: int = 0, timeout: float = 120.0,
                 start_timeout: float = 10.0, workdir: Path | str | None = None) -> None:
        endpoints = read_registry(registry, names)
        self._setup(run_seed, timeout, workdir)
        self.registry = Path(registry)
        root = Path(keys) if keys is not None else self.registry.parent
        missing = [str(p) for p in [root / "private" / f"{CONTROLLER}.key_secret",
                                    *(root / "public" / f"{n}.key" for n in endpoints)]
                   if not p.is_file()]
        if missing:
            self.close()
            raise ConfigError(f"key files missing: {missing}; pass the cluster's key directory "
                              f"(edgert keys --out DIR --boards {','.join(endpoints)}) as keys=")
        self.keys = KeyRing(root)
        self.boards = [BoardHandle(n, _Remote(), ep, self.root / f"{n}.log")
                       for n, ep in endpoints.items()]
        try:
            self._connect(start_timeout)
        except BoardError as e:
            self.close()
            raise BoardError(
                f"{e}. A silent board: is its daemon running (`edgert-board status` on it), is "
                f"the endpoint in {self.registry} reachable from here, and does it hold this "
                f"cluster's keys (its conf/ must have {root / 'public'}/{CONTROLLER}.key; with "
                f"other keys CURVE drops our messages without an answer)?") from None
        except BaseException:
            self.close()
            raise

    def pin(self, name: str, cores: set[int]) -> None:
        raise ConfigError(f"{name} is a remote board: pinning needs a local process")

    def throttle(self, name: str, fraction: float, core: int | None = None) -> None:
        raise ConfigError(f"{name} is a remote board: throttling needs a local process")

    def describe(self) -> list[dict[str, Any]]:
        """[{name, endpoint}] of the attached boards."""
        return [{"name": b.name, "endpoint": b.endpoint} for b in self.boards]
