#!/usr/bin/env bash
# Build (once) the root filesystem of the emulated aarch64 board: an arm64 Python 3.11 unpacked from
# Debian .deb files (no maintainer scripts, nothing runs under emulation) plus aarch64 wheels of the
# board runtime (numpy, pyzmq, apache-tvm, apache-tvm-ffi, safetensors, psutil) fetched by the host's
# pip. Idempotent: a stamp over this script's recipe makes a second run a no-op.
#
# Usage: boards/emulated/make_rootfs.sh [ROOT]
#   ROOT defaults to $EDGERT_ARM64_ROOT, else ~/.cache/edgert/arm64-rootfs.
#   Needs root (dpkg --add-architecture arm64, apt-get update) unless the arm64 package lists exist,
#   and qemu-user-static. Prints ROOT on stdout when done. How a board runs in it: docs/boards.md
#   (control/boards.py: qemu_command, profile_launcher for LocalCluster).
set -euo pipefail

ROOT=${1:-${EDGERT_ARM64_ROOT:-$HOME/.cache/edgert/arm64-rootfs}}
SITE="$ROOT/opt/edgert-site"          # the wheels (PYTHONPATH on the board)
DEBS="python3.11-minimal libpython3.11-stdlib libstdc++6 libgcc-s1 libc6 zlib1g libssl3 libffi8 libexpat1 libbz2-1.0 liblzma5 libuuid1 libgomp1"
WHEELS="numpy==2.4.6 pyzmq==27.3.0 apache-tvm==0.27.0.post1 apache-tvm-ffi==0.1.14.post1 safetensors==0.8.0 psutil==7.2.2 typing_extensions==4.16.0"
RECIPE="v2|$DEBS|$WHEELS"
STAMP="$ROOT/.edgert-rootfs-stamp"
ROOT_PY=${PYTHON:-python3}   # any host Python with pip: it only downloads and unpacks wheels

say() { printf '[arm64-rootfs] %s\n' "$*" >&2; }

# binfmt_misc: lets an emulated process start other aarch64 programs (the daemon's backend probe
# is a child Python). QEMU_LD_PREFIX=ROOT in the child's environment then finds the libraries.
register_binfmt() {
  local bm=/proc/sys/fs/binfmt_misc conf=/usr/lib/binfmt.d/qemu-aarch64.conf
  [ -e "$bm/qemu-aarch64" ] && return 0
  if [ "$(id -u)" != 0 ] || [ ! -f "$conf" ]; then
    say "WARNING: qemu-aarch64 is not registered with binfmt_misc (run once as root:"
    say "  mount -t binfmt_misc binfmt_misc $bm; cat $conf > $bm/register)"; return 0
  fi
  [ -e "$bm/register" ] || mount -t binfmt_misc binfmt_misc "$bm" 2>/dev/null || true
  if [ -e "$bm/register" ]; then cat "$conf" > "$bm/register" || true; fi
  [ -e "$bm/qemu-aarch64" ] || say "WARNING: could not register qemu-aarch64 with binfmt_misc"
}

if [ "$(cat "$STAMP" 2>/dev/null)" = "$RECIPE" ]; then
  register_binfmt
  echo "$ROOT"; exit 0
fi
command -v qemu-aarch64-static >/dev/null || {
  say "qemu-aarch64-static is missing: apt-get install qemu-user-static"; exit 1; }
register_binfmt

t0=$(date +%s)
# 1. arm64 package lists (host-side apt; nothing is installed on the host).
if ! dpkg --print-foreign-architectures | grep -qx arm64 || ! apt-cache show libc6:arm64 >/dev/null 2>&1; then
  [ "$(id -u)" = 0 ] || { say "run once as root: dpkg --add-architecture arm64 && apt-get update"; exit 1; }
  say "adding the arm64 architecture to apt and updating its lists"
  dpkg --add-architecture arm64
  apt-get update -qq -o DPkg::Lock::Timeout=600 >/dev/null
fi

# 2. Resolve the packages' dependency closure (arm64 only; arch-independent data packages skipped).
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
pkgs=$(for p in $DEBS; do echo "$p:arm64"; done)
# shellcheck disable=SC2086  # word splitting of the package list is intended
closure=$(apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks \
  --no-replaces --no-enhances --no-pre-depends $pkgs 2>/dev/null | grep -E '^[a-z0-9].*:arm64$' | sort -u)
# Pre-Depends matter too (libc6 for most), but not the dpkg/debconf tooling they drag in.
closure=$(printf '%s\n' "$closure" | grep -vE '^(debconf|dpkg|perl-base|tar|install-info|gcc-12-base|readline-common|libreadline8|libncursesw6|libtinfo6|libsqlite3-0|libdb5.3|libnsl2|libtirpc3|libtirpc-common|libgssapi-krb5-2|libkrb5-3|libk5crypto3|libkrb5support0|libkeyutils1|libcom-err2|libcrypt1|media-types|tzdata|netbase):arm64$' || true)
say "downloading $(echo "$closure" | wc -w) arm64 packages"
# shellcheck disable=SC2086  # one word per package
(cd "$work" && chmod 755 . && apt-get download -qq $closure >/dev/null 2>&1)

# 3. Unpack without maintainer scripts (nothing has to run under emulation).
rm -rf "$ROOT"
mkdir -p "$ROOT"
for d in "$work"/*.deb; do dpkg-deb -x "$d" "$ROOT"; done
# Debian 12 keeps libraries in /usr/lib (merged /usr): the loader looks in /lib and /lib64.
for l in lib lib64 bin sbin; do [ -e "$ROOT/$l" ] || ln -s "usr/$l" "$ROOT/$l"; done
mkdir -p "$ROOT/usr/lib64" "$ROOT/etc"
[ -e "$ROOT/usr/lib64/ld-linux-aarch64.so.1" ] || \
  ln -s ../lib/aarch64-linux-gnu/ld-linux-aarch64.so.1 "$ROOT/usr/lib64/ld-linux-aarch64.so.1"

# 4. The board's wheels, installed by the host's pip for the board's platform.
say "fetching aarch64 wheels: $WHEELS"
# shellcheck disable=SC2086
env -u PIP_FIND_LINKS "$ROOT_PY" -m pip install -q --no-compile --no-deps --only-binary=:all: \
  --platform manylinux_2_28_aarch64 --platform manylinux2014_aarch64 --python-version 3.11 \
  --implementation cp --abi cp311 --abi abi3 --target "$SITE" $WHEELS >"$work/pip.log" 2>&1 || {
  cat "$work/pip.log" >&2; say "pip could not fetch the aarch64 wheels (PyPI reachable?)"; exit 1; }
# The board never loads TVM's compiler (libtvm.so, ~70% of the wheel): drop it, keep the runtime.
rm -f "$SITE/tvm/lib/libtvm_compiler.so"

# 5. Smoke test under qemu: the runtime imports.
QEMU_CPU=cortex-a76 PYTHONPATH="$SITE" PYTHONNOUSERSITE=1 qemu-aarch64-static -L "$ROOT" \
  "$ROOT/usr/bin/python3.11" -c "import numpy, zmq, tvm_ffi, safetensors, psutil, platform; print(platform.machine())" \
  | grep -qx aarch64 || { say "smoke test failed: the rootfs in $ROOT does not run"; exit 1; }
echo "$RECIPE" > "$STAMP"
say "ready in $(( $(date +%s) - t0 )) s: $ROOT ($(du -sh "$ROOT" | cut -f1))"
echo "$ROOT"
