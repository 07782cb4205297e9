"""Backend probing (edgert/backends.py): the child-process probe, crash isolation, fallbacks."""

from __future__ import annotations

import json
import subprocess
import sys

from edgert import backends


def _report(opencl_api=False, opencl_devices=1, cuda_api=False, cuda_devices=0):
    return {"usable": {"cpu": True, "opencl": opencl_api and opencl_devices > 0,
                       "cuda": cuda_api and cuda_devices > 0},
            "tvm": {"device_api": {"cpu": True, "opencl": opencl_api, "cuda": cuda_api}},
            "opencl": {"icd": True, "platforms": [{"name": "Mali-G610", "devices": opencl_devices}],
                       "error": None},
            "cuda": {"driver": cuda_devices > 0, "devices": cuda_devices, "error": None}}


def test_resolve_uses_what_is_usable_and_keeps_order():
    use, notes = backends.resolve(["cpu", "opencl"], _report(opencl_api=True))
    assert use == ["cpu", "opencl"] and notes == []


def test_resolve_falls_back_to_cpu_naming_the_missing_runtime():
    use, notes = backends.resolve(["opencl"], _report(opencl_api=False))
    assert use == ["cpu"]
    assert len(notes) == 1 and "built without OpenCL" in notes[0] and "Mali-G610" in notes[0]
    assert "USE_OPENCL=ON" in notes[0]


def test_resolve_missing_driver_is_a_different_message():
    use, notes = backends.resolve(["cpu", "opencl"], _report(opencl_api=True, opencl_devices=0))
    assert use == ["cpu"] and "no OpenCL device" in notes[0]


def test_resolve_cuda_and_unknown_backends():
    use, notes = backends.resolve(["cuda", "tpu"], _report())
    assert use == ["cpu"]
    assert any("unknown backend 'tpu'" in n for n in notes)
    assert any("without CUDA" in n for n in notes)
    use, _ = backends.resolve(["cpu", "cuda"], _report(cuda_api=True, cuda_devices=1))
    assert use == ["cpu", "cuda"]


def test_probe_reports_this_machine():
    rep = backends.probe()
    assert "probe_error" not in rep, rep.get("probe_error")
    assert rep["usable"]["cpu"] is True
    assert rep["cpu"]["cores"] >= 1 and rep["tvm"]["device_api"]["cpu"] is True
    # The PyPI TVM wheel has no OpenCL device API, so opencl is never usable through it.
    if not rep["tvm"]["device_api"]["opencl"]:
        assert rep["usable"]["opencl"] is False


def test_probe_survives_a_crashing_driver():
    crash = [sys.executable, "-c", "import sys, os; print('segfault in libmali', file=sys.stderr);"
             " sys.stderr.flush(); os.abort()"]
    rep = backends.probe(argv=crash)
    assert rep["usable"] == {"cpu": True, "opencl": False, "cuda": False}
    assert "killed by signal" in rep["probe_error"] and "libmali" in rep["probe_error"]
    use, notes = backends.resolve(["cpu", "opencl"], rep)
    assert use == ["cpu"] and "killed by signal" in notes[0]


def test_probe_survives_a_hanging_driver_and_garbage():
    rep = backends.probe(timeout=1.0, argv=[sys.executable, "-c", "import time; time.sleep(30)"])
    assert "hung" in rep["probe_error"] and rep["usable"]["cpu"]
    rep = backends.probe(argv=[sys.executable, "-c", "print('not json')"])
    assert "no JSON" in rep["probe_error"]
    rep = backends.probe(argv=["/nonexistent/python3"])
    assert "could not start" in rep["probe_error"] and rep["usable"]["cpu"]


def test_probe_cli_json():
    r = subprocess.run([sys.executable, "-m", "edgert", "probe", "--json", "--backends",
                        "cpu,opencl"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["use"][0] == "cpu" and "usable" in out
