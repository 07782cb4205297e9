"""boards/provision.sh against a real SSH server (Debian's openssh-server) on a loopback port.

A throwaway user and keys in a temp dir; the "board" is this machine seen through sshd. Provision
twice: the first run installs everything and starts the daemon, the second changes nothing. Then
the controller reaches the provisioned daemon over CURVE ZeroMQ and gets a HELLO answer, and a
client without the cluster's key gets nothing. Needs root (useradd, sshd); skipped otherwise.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from edgert.protocol import Kind, Message
from edgert.transport import CONTROLLER, KeyRing, ZmqTransport, generate_keys

REPO = Path(__file__).resolve().parents[2]
SSHD = "/usr/sbin/sshd"
pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not Path(SSHD).is_file() or shutil.which("useradd") is None,
    reason="needs root and openssh-server (scripts/setup.sh installs it)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(*cmd: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


@pytest.fixture(scope="module")
def ssh_board():
    """sshd on 127.0.0.1:<free port> for a new user whose only login is a fresh ed25519 key."""
    tmp = Path(tempfile.mkdtemp(prefix="edgert-ssh-", dir="/tmp"))
    tmp.chmod(0o755)
    user = f"edgetest{os.getpid() % 100000}"
    home = tmp / "home"
    _run("useradd", "-m", "-d", str(home), "-s", "/bin/sh", user)
    sshd = None
    try:
        _run("usermod", "-p", "*", user)             # no password, but not a locked account
        _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp / "host_key"))
        _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp / "id"))
        ssh_dir = home / ".ssh"
        ssh_dir.mkdir(mode=0o700, exist_ok=True)
        shutil.copy(tmp / "id.pub", ssh_dir / "authorized_keys")
        pw = pwd.getpwnam(user)
        for p in (ssh_dir, ssh_dir / "authorized_keys"):
            os.chown(p, pw.pw_uid, pw.pw_gid)
        port = _free_port()
        (tmp / "sshd_config").write_text(
            f"Port {port}\nListenAddress 127.0.0.1\nHostKey {tmp / 'host_key'}\n"
            f"PidFile {tmp / 'sshd.pid'}\nAuthorizedKeysFile .ssh/authorized_keys\n"
            f"PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
            f"AllowUsers {user}\n")
        Path("/run/sshd").mkdir(exist_ok=True)      # privilege separation directory
        sshd = subprocess.Popen([SSHD, "-D", "-e", "-f", str(tmp / "sshd_config")],
                                stderr=open(tmp / "sshd.log", "wb"))
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        keys = tmp / "keys"
        generate_keys(keys, ["board0"])
        yield {"tmp": tmp, "user": user, "port": port, "home": home, "keys": keys,
               "prefix": home / "edgert"}
    finally:
        pidf = home / "edgert" / "run" / "board.pid"
        if pidf.is_file():                           # the daemon we started, by its pid
            try:
                os.kill(int(pidf.read_text()), 15)
                time.sleep(1)
            except (ProcessLookupError, ValueError):
                pass
        if sshd is not None:
            sshd.terminate()
            sshd.wait(10)
        subprocess.run(["userdel", user], capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)


def _provision(b, profile: Path) -> str:
    r = subprocess.run(
        ["bash", str(REPO / "boards/provision.sh"), "--host", "127.0.0.1", "--user", b["user"],
         "--ssh-port", str(b["port"]), "--identity", str(b["tmp"] / "id"),
         "--known-hosts", str(b["tmp"] / "known_hosts"), "--name", "board0",
         "--profile", str(profile), "--keys", str(b["keys"]), "--start"],
        capture_output=True, text=True, timeout=900, check=False)
    print(r.stdout, r.stderr)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def _hello(keys: Path, endpoint: str, timeout: float, name: str = "board0"):
    t = ZmqTransport(CONTROLLER, keys=KeyRing(keys), max_msg_bytes=-1)
    try:
        t.connect(name, endpoint)
        t.send(name, Message.make(Kind.HELLO, "", 1))
        return t.recv(timeout)
    finally:
        t.close()


def test_provision_twice_then_the_daemon_answers(ssh_board, tmp_path):
    b = ssh_board
    port = _free_port()
    profile = tmp_path / "loopback-x86.toml"       # the local profile, reached over ssh
    profile.write_text((REPO / "boards/profiles/local.toml").read_text()
                       .replace('name = "local"', 'name = "loopback-x86"')
                       .replace('cpu = "host"', 'cpu = "host"\nopencl = { kind = "opencl" }')
                       .replace('kind = "local"', f'kind = "ssh"\nuser = "{b["user"]}"\n'
                                f'port = {port}'))
    first = _provision(b, profile)
    assert re.search(r"board board0: [1-9]\d* change\(s\)", first), first
    assert "changed: runtime wheels" in first and "changed: daemon started" in first
    # The profile asks for cpu + opencl; PoCL is installed here, but the PyPI TVM runtime has no
    # OpenCL device API: the probe (on the board, in a child process) says so and the board uses
    # its CPU. (This VM has neither systemd nor cron: the boot hook is reported missing too.)
    assert "backends usable on the board: cpu\n" in first
    missing = [ln for ln in first.splitlines() if ln.startswith("[provision] missing:")]
    assert any("OpenCL" in ln for ln in missing), missing

    second = _provision(b, profile)
    assert "board board0: 0 change(s)" in second, second
    assert "changed:" not in second

    reg = json.loads((b["keys"] / "boards.json").read_text())
    assert reg["board0"]["endpoint"] == f"tcp://127.0.0.1:{port}"
    pid = int((b["prefix"] / "run" / "board.pid").read_text())
    assert Path(f"/proc/{pid}").stat().st_uid == pwd.getpwnam(b["user"]).pw_uid
    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    assert f"PYTHONPATH={b['prefix']}/site:{b['prefix']}/src".encode() in env

    r = _hello(b["keys"], reg["board0"]["endpoint"], 30.0)
    assert r is not None, "the provisioned daemon did not answer HELLO"
    peer, msg = r
    assert msg.kind is Kind.HELLO and msg.header.body["board"] == "board0"
    assert msg.header.body["pid"] == pid
    # Only the cluster's keys may talk to it: a stranger's key gets no answer.
    stranger = generate_keys(tmp_path / "other", [])
    shutil.copy(b["keys"] / "public" / "board0.key", stranger.public_dir)
    assert _hello(stranger.root, reg["board0"]["endpoint"], 3.0) is None


def test_provision_refuses_a_profile_of_another_arch(ssh_board):
    b = ssh_board
    r = subprocess.run(
        ["bash", str(REPO / "boards/provision.sh"), "--host", "127.0.0.1", "--user", b["user"],
         "--ssh-port", str(b["port"]), "--identity", str(b["tmp"] / "id"),
         "--known-hosts", str(b["tmp"] / "known_hosts"), "--name", "board0",
         "--profile", "rk3588", "--keys", str(b["keys"])],
        capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode != 0
    assert "the board is x86_64 but profile rk3588 is for aarch64" in r.stderr


def test_provision_script_is_shellcheck_clean():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed (scripts/setup.sh installs it)")
    scripts = [REPO / "boards/provision.sh", REPO / "boards/emulated/make_rootfs.sh",
               *sorted((REPO / "boards/links").glob("*.sh"))]
    r = subprocess.run(["shellcheck", *map(str, scripts)], capture_output=True, text=True,
                       check=False)
    assert r.returncode == 0, r.stdout
