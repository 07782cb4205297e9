"""Which compute backends a board really has, probed in a subprocess.

    python -m edgert.backends            # JSON report of this machine (what `edgert probe` prints)

A board profile names backends (`cpu`, `opencl`, `cuda`); what the board can actually run depends
on its drivers *and* on how its TVM runtime was built (the PyPI wheel has no OpenCL or CUDA device
API). Probing loads drivers, and a broken GPU driver can crash the process that loads it, so the
probe runs in a child process: a crash there is reported, never fatal to the board daemon.

The report (plain JSON):

    cpu      {cores, clusters: [{cpus, max_khz}], isa: [...]}   (big.LITTLE -> 2 clusters)
    tvm      {device_api: {cpu: bool, opencl: bool, cuda: bool, vulkan: bool}}
    opencl   {icd: bool, platforms: [{name, devices}], error}    (the driver side, via libOpenCL)
    cuda     {driver: bool, devices: int, error}                  (the driver side, via libcuda)
    usable   {cpu: true, opencl: bool, cuda: bool}   a backend is usable when both its driver and
                                                      TVM's device API for it are present

`resolve(requested, report)` turns a profile's wish list into what the board will use, falling
back to the CPU with a message that says what is missing and how to get it.

Examples
--------
>>> rep = {"usable": {"cpu": True, "opencl": False},
...        "opencl": {"icd": True, "platforms": [{"name": "Mali", "devices": 1}]},
...        "tvm": {"device_api": {"opencl": False}}}
>>> use, notes = resolve(["cpu", "opencl"], rep)
>>> use
['cpu']
>>> "without OpenCL" in notes[0]
True
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

KNOWN = ("cpu", "opencl", "cuda")
_DEVICE_API = {"cpu": "device_api.cpu", "opencl": "device_api.opencl", "cuda": "device_api.cuda",
               "vulkan": "device_api.vulkan"}


# ---- probing (runs in the child) -------------------------------------------------------------------
def _cpu() -> dict[str, Any]:
    cpus = sorted(os.sched_getaffinity(0))
    by_freq: dict[int, list[int]] = {}
    for c in cpus:
        f = Path(f"/sys/devices/system/cpu/cpu{c}/cpufreq/cpuinfo_max_freq")
        try:
            khz = int(f.read_text().strip())
        except (OSError, ValueError):
            khz = 0
        by_freq.setdefault(khz, []).append(c)
    clusters = [{"cpus": v, "max_khz": k} for k, v in sorted(by_freq.items(), reverse=True)]
    isa: list[str] = []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                words = set(line.split(":", 1)[1].split())
                isa = sorted(words & {"avx2", "avx512f", "fma", "neon", "asimd", "asimddp",
                                      "sve", "fphp", "asimdhp", "i8mm", "bf16"})
                break
    except OSError:
        pass
    return {"cores": len(cpus), "clusters": clusters, "isa": isa}


def _opencl_driver() -> dict[str, Any]:
    try:
        cl = ctypes.CDLL("libOpenCL.so.1")
    except OSError as e:
        return {"icd": False, "platforms": [], "error": f"no OpenCL ICD loader: {e}"}
    n = ctypes.c_uint(0)
    if cl.clGetPlatformIDs(0, None, ctypes.byref(n)) != 0 or n.value == 0:
        return {"icd": True, "platforms": [], "error": "the ICD loader found no OpenCL platform"}
    ids = (ctypes.c_void_p * n.value)()
    cl.clGetPlatformIDs(n.value, ids, None)
    plats = []
    for p in ids:
        buf = ctypes.create_string_buffer(256)
        cl.clGetPlatformInfo(ctypes.c_void_p(p), 0x0902, 256, buf, None)   # CL_PLATFORM_NAME
        nd = ctypes.c_uint(0)
        cl.clGetDeviceIDs(ctypes.c_void_p(p), ctypes.c_uint64(0xFFFFFFFF), 0, None,
                          ctypes.byref(nd))                                   # CL_DEVICE_TYPE_ALL
        plats.append({"name": buf.value.decode(errors="replace"), "devices": nd.value})
    return {"icd": True, "platforms": plats, "error": None}


def _cuda_driver() -> dict[str, Any]:
    try:
        cu = ctypes.CDLL("libcuda.so.1")
    except OSError as e:
        return {"driver": False, "devices": 0, "error": f"no CUDA driver: {e}"}
    if cu.cuInit(0) != 0:
        return {"driver": True, "devices": 0, "error": "cuInit failed"}
    n = ctypes.c_int(0)
    cu.cuDeviceGetCount(ctypes.byref(n))
    return {"driver": True, "devices": n.value, "error": None}


def _tvm_device_apis() -> dict[str, Any]:
    try:
        from edgert.runtime import load_runtime

        f = load_runtime(block_torch=True)
    except Exception as e:  # noqa: BLE001 - reported, the parent decides
        return {"device_api": {k: False for k in _DEVICE_API}, "error": f"{type(e).__name__}: {e}"}
    return {"device_api": {k: f.get_global_func(v, allow_missing=True) is not None
                           for k, v in _DEVICE_API.items()}, "error": None}


def probe_here() -> dict[str, Any]:
    """The report for this process (may load GPU drivers: prefer `probe`, which isolates it)."""
    tvm = _tvm_device_apis()
    ocl, cuda = _opencl_driver(), _cuda_driver()
    api = tvm["device_api"]
    usable = {"cpu": bool(api.get("cpu")),
              "opencl": bool(api.get("opencl")) and any(p["devices"] for p in ocl["platforms"]),
              "cuda": bool(api.get("cuda")) and cuda["devices"] > 0}
    return {"cpu": _cpu(), "tvm": tvm, "opencl": ocl, "cuda": cuda, "usable": usable}


# ---- the parent's side -----------------------------------------------------------------------------
def probe(timeout: float = 60.0, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the probe in a child process; a crash or hang there becomes `probe_error`, not ours.

    `argv` replaces the child's command (tests use it to simulate a crashing driver).
    """
    cmd = list(argv) if argv is not None else [sys.executable, "-m", "edgert.backends"]
    try:
        r = subprocess.run(cmd, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return _fallback(f"the backend probe hung for {timeout:.0f} s (a GPU driver that never "
                         f"returns?); only the CPU is used")
    except OSError as e:   # cannot even start it (e.g. an emulated board without binfmt_misc)
        return _fallback(f"the backend probe could not start ({e}); only the CPU is used")
    if r.returncode != 0:
        how = (f"was killed by signal {-r.returncode}" if r.returncode < 0
               else f"exited with code {r.returncode}")
        tail = r.stderr.decode(errors="replace").strip().splitlines()[-3:]
        return _fallback(f"the backend probe {how} (a crashing GPU driver?); only the CPU is "
                         f"used. Its last words: {' | '.join(tail) or '(none)'}")
    try:
        return json.loads(r.stdout)
    except json.JSONDecodeError as e:
        return _fallback(f"the backend probe printed no JSON ({e}); only the CPU is used")


def _fallback(error: str) -> dict[str, Any]:
    return {"cpu": _cpu(), "tvm": {"device_api": {}}, "opencl": {}, "cuda": {},
            "usable": {"cpu": True, "opencl": False, "cuda": False}, "probe_error": error}


def resolve(requested: Sequence[str], report: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(backends to use, messages): every requested backend the board lacks falls back to the CPU."""
    use: list[str] = []
    notes: list[str] = []
    if report.get("probe_error"):
        notes.append(report["probe_error"])
    usable = report.get("usable", {})
    for b in requested:
        if b not in KNOWN:
            notes.append(f"unknown backend {b!r} in the board profile (known: {', '.join(KNOWN)}); "
                         f"ignored")
        elif usable.get(b):
            if b not in use:
                use.append(b)
        elif b != "cpu":
            notes.append(_why_missing(b, report))
    if "cpu" not in use:
        use.insert(0, "cpu")
    return use, notes


def _why_missing(b: str, report: dict[str, Any]) -> str:
    api = report.get("tvm", {}).get("device_api", {})
    if b == "opencl":
        drv = report.get("opencl", {})
        plats = ", ".join(p["name"] for p in drv.get("platforms", [])) or "none"
        if not api.get("opencl"):
            return (f"backend opencl unavailable: this board's TVM runtime was built without "
                    f"OpenCL (the PyPI apache-tvm wheel has none; OpenCL platforms present: "
                    f"{plats}). Build libtvm_runtime with USE_OPENCL=ON for this board; "
                    f"falling back to the CPU")
        return (f"backend opencl unavailable: no OpenCL device ({drv.get('error') or 'none found'})."
                f" Install the GPU vendor's OpenCL driver (Mali: libmali / panfrost+rusticl; "
                f"Adreno: the phone's libOpenCL.so); falling back to the CPU")
    if not api.get("cuda"):
        return ("backend cuda unavailable: this board's TVM runtime was built without CUDA; "
                "install a CUDA-enabled TVM runtime (e.g. built on the Jetson with USE_CUDA=ON); "
                "falling back to the CPU")
    return (f"backend cuda unavailable: {report.get('cuda', {}).get('error') or 'no CUDA device'}; "
            f"falling back to the CPU")


def main() -> int:
    print(json.dumps(probe_here(), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
