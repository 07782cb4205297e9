"""Board profiles (boards/profiles/*.toml): every file loads, names a known preset, and bad
profiles are refused with a message that says how to fix them. Pure: no TVM, no sockets."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from compiler.arch import PRESETS
from edgert.errors import ConfigError
from edgert.profile import PROFILES_DIR, list_profiles, load_profile, parse_profile

NAMES = list_profiles()
REQUIRED = {"rk3588", "snapdragon-8gen2", "raspberry-pi-5", "jetson-orin-nano", "local", "qemu-a76"}


def test_the_required_profiles_exist():
    assert REQUIRED <= set(NAMES), sorted(REQUIRED - set(NAMES))


@pytest.mark.parametrize("name", NAMES)
def test_profile_is_valid(name):
    p = load_profile(name)
    assert p.name == name and p.path == PROFILES_DIR / f"{name}.toml"
    assert "cpu" in p.backends and 0 < p.budget_mib <= p.memory_mib and 1 <= p.threads <= p.cores
    for backend, t in p.targets.items():
        if isinstance(t, str):       # a preset: must exist in compiler/arch.py
            assert t == "host" or t in PRESETS, f"{name}: {backend} preset {t!r} unknown"
            if t != "host":          # the preset's CPU side must match the board's arch
                assert PRESETS[t]["elf_machine"] == p.arch, (name, t)
        else:
            assert t["kind"] == backend, (name, t)
    if p.gpu is not None:
        assert p.gpu.api in p.backends, f"{name}: GPU api {p.gpu.api} has no target"
    if p.reach.kind == "ssh":
        assert p.reach.user and p.reach.port > 0 and p.reach.bind == "0.0.0.0"


def test_specific_boards():
    rk = load_profile("rk3588")
    assert [(c.name, c.cores, c.core) for c in rk.cpu_cluster] == [
        ("big", 4, "cortex-a76"), ("little", 4, "cortex-a55")]
    assert rk.targets == {"cpu": "arm64", "opencl": "mali"} and rk.gpu.name == "Mali-G610 MP4"
    assert load_profile("snapdragon-8gen2").targets["opencl"] == "adreno"
    assert load_profile("raspberry-pi-5").backends == ("cpu",)
    assert load_profile("jetson-orin-nano").targets["cuda"]["arch"] == "sm_87"
    q = load_profile("qemu-a76")
    assert q.reach.kind == "emulated" and q.reach.qemu_cpu == "cortex-a76" and q.arch == "aarch64"
    assert load_profile(PROFILES_DIR / "local.toml").reach.kind == "local"


def _doc(**over):
    d = tomllib.loads((PROFILES_DIR / "raspberry-pi-5.toml").read_text())
    for k, v in over.items():
        if v is None:
            d.pop(k)
        else:
            d[k] = v
    return d


@pytest.mark.parametrize("over, msg", [
    ({"memroy_mib": 1}, r"unknown key\(s\) memroy_mib; valid keys: .*memory_mib"),
    ({"memory_mib": None}, r"memory_mib"),
    ({"budget_mib": 9000}, r"budget_mib 9000 exceeds memory_mib 8192"),
    ({"threads": 9}, r"threads 9 > the 4 cores"),
    ({"threads": "4"}, r"threads must be a positive integer"),
    ({"arch": "armv7l"}, r"arch must be one of x86_64, aarch64"),
    ({"targets": {"opencl": "mali"}}, r"needs a cpu entry"),
    ({"targets": {"cpu": "arm64", "vulkan": "x"}}, r"unknown backend 'vulkan'"),
    ({"targets": {"cpu": {"mcpu": "a76"}}}, r"preset name .* or a TVM target table with a 'kind'"),
    ({"cpu_cluster": []}, r"at least one \[\[cpu_cluster\]\]"),
    ({"cpu_cluster": [{"name": "big", "cores": 4, "freq": 1}]},
     r"\[\[cpu_cluster\]\]: unknown key"),
    ({"reach": {"kind": "ssh", "host": "pi"}}, r"needs reach.user"),
    ({"reach": {"kind": "serial"}}, r"reach.kind must be one of local, ssh, emulated"),
    ({"reach": {"kind": "local", "port": 70000}}, r"reach.port must be a port number"),
    ({"reach": {"kind": "emulated"}}, r"needs reach.emulator"),
])
def test_bad_profiles_are_refused_with_a_fix(over, msg):
    with pytest.raises(ConfigError, match=msg):
        parse_profile(_doc(**over))


def test_missing_file_and_bad_toml(tmp_path):
    with pytest.raises(ConfigError, match=r"no board profile 'nope' .* known: .*rk3588"):
        load_profile("nope")
    with pytest.raises(ConfigError, match=r"does not exist"):
        load_profile(tmp_path / "x.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("name = [")
    with pytest.raises(ConfigError, match=r"not valid TOML"):
        load_profile(bad)
    other = tmp_path / "pi.toml"
    other.write_text((PROFILES_DIR / "raspberry-pi-5.toml").read_text())
    with pytest.raises(ConfigError, match=r"differs from the file name"):
        load_profile(other)


def test_launchers_build_the_emulated_and_native_commands(tmp_path, monkeypatch):
    from control import boards

    argv = ["/venv/bin/python", "-m", "edgert", "serve", "--name", "board1"]
    cmd = boards.qemu_command(tmp_path, argv, src=Path("/src"))
    assert cmd[:2] == ["env", "-i"] and "QEMU_CPU=cortex-a76" in cmd
    assert f"QEMU_LD_PREFIX={tmp_path}" in cmd
    assert f"PYTHONPATH={tmp_path / 'opt/edgert-site'}:/src" in cmd
    i = cmd.index("qemu-aarch64-static")
    assert cmd[i + 1:i + 4] == ["-L", str(tmp_path), str(tmp_path / "usr/bin/python3.11")]
    assert cmd[i + 4:] == argv[1:]
    launch = boards.qemu_launcher(tmp_path, {"board1"}, src=Path("/src"))
    assert launch("board0", argv) == argv and launch("board1", argv) == cmd

    (tmp_path / ".edgert-rootfs-stamp").write_text("x")      # no build in a unit test
    monkeypatch.setattr(boards, "arm64_rootfs", lambda root=None, build=True: tmp_path)
    launch = boards.profile_launcher({"board0": load_profile("local"),
                                      "board1": load_profile("qemu-a76")})
    assert launch("board0", argv) == [*argv, "--board", str(PROFILES_DIR / "local.toml")]
    emu = launch("board1", argv)
    assert "qemu-aarch64-static" in emu and emu[-2:] == ["--board",
                                                         str(PROFILES_DIR / "qemu-a76.toml")]
    assert launch("board2", argv) == argv
    with pytest.raises(ConfigError, match=r"reached over ssh: provision it"):
        boards.profile_launcher({"b": load_profile("rk3588")})
