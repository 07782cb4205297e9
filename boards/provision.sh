#!/usr/bin/env bash
# Provision an edge board over SSH so that `edgert serve --board PROFILE` runs on it (and at boot).
#
# Usage: boards/provision.sh --host HOST --user USER --name BOARD --profile PROFILE --keys KEYDIR
#          [--ssh-port 22] [--identity FILE] [--known-hosts FILE] [--prefix DIR] [--start]
#          [--registry FILE]
#   PROFILE   a name in boards/profiles or a .toml path (its arch, port, listen address, backends)
#   KEYDIR    the cluster's keys (`edgert keys --out KEYDIR --boards BOARD,...`): the board gets
#             every public key and its own secret key, nothing else
#   --prefix  where everything goes on the board (default: ~/edgert of USER)
#   --start   (re)start the daemon if it is not running and register its endpoint in --registry
#             (default KEYDIR/boards.json)
#
# What it does, each step skipped when the board already has it (a second run changes nothing):
#   1. checks the board's architecture (must match the profile) and python3 (>= 3.11)
#   2. copies the runtime wheels for that arch/Python, installed on the controller by pip
#      (--platform, --target; cached in ~/.cache/edgert/board-site): boards need no internet
#   3. copies the board part of edgert (edgert/ only), the profile and the keys
#   4. installs PREFIX/bin/edgert-board (start|stop|status|run|probe, pid file) and a boot hook:
#      a systemd unit if systemd runs, else a crontab @reboot line, else says what is missing
#   5. runs the backend probe on the board (in a child process) and reports what is missing
#   6. with --start: starts the daemon and records its endpoint for the controller
# Every line of the report starts with [provision]; the last one counts changes and missing items.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$REPO/.venv/bin/python}
[ -x "$PY" ] || PY=python3
HOST="" USER_="" NAME="" PROFILE="" KEYS="" SSH_PORT=22 IDENTITY="" KNOWN="" PREFIX="" START=0
REGISTRY=""
changed=0 missing=0

say() { printf '[provision] %s\n' "$*"; }
did() { changed=$((changed + 1)); say "changed: $*"; }
ok() { say "ok: $*"; }
miss() { missing=$((missing + 1)); say "missing: $*"; }
die() { say "error: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
  case "$1" in
    --host) HOST=$2; shift 2 ;;
    --user) USER_=$2; shift 2 ;;
    --name) NAME=$2; shift 2 ;;
    --profile) PROFILE=$2; shift 2 ;;
    --keys) KEYS=$2; shift 2 ;;
    --ssh-port) SSH_PORT=$2; shift 2 ;;
    --identity) IDENTITY=$2; shift 2 ;;
    --known-hosts) KNOWN=$2; shift 2 ;;
    --prefix) PREFIX=$2; shift 2 ;;
    --registry) REGISTRY=$2; shift 2 ;;
    --start) START=1; shift ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done
for v in HOST USER_ NAME PROFILE KEYS; do
  [ -n "${!v}" ] || die "--$(echo "${v%_}" | tr '[:upper:]' '[:lower:]') is required (see --help)"
done
[ -f "$KEYS/private/$NAME.key_secret" ] || \
  die "no secret key for board $NAME in $KEYS/private: run edgert keys --out $KEYS --boards $NAME,..."
REGISTRY=${REGISTRY:-$KEYS/boards.json}

# ---- the profile (read with the board's own loader) -------------------------------------------
prof=$("$PY" - "$PROFILE" <<'PY'
import sys
sys.path.insert(0, __import__("os").environ.get("EDGERT_SRC", "."))
from edgert.errors import ConfigError
from edgert.profile import load_profile
try:
    p = load_profile(sys.argv[1])
except ConfigError as e:
    sys.exit(f"[provision] error: {e}")
print(p.name, p.arch, p.reach.port, p.reach.bind, ",".join(p.backends), p.path)
PY
) || exit 1
read -r PNAME PARCH _ _ PBACKENDS PPATH <<<"$prof"
say "board $NAME: profile $PNAME ($PARCH, backends $PBACKENDS) at $USER_@$HOST:$SSH_PORT"

# ---- ssh --------------------------------------------------------------------------------------
SSH=(ssh -p "$SSH_PORT" -o BatchMode=yes -o ConnectTimeout=15 -o StrictHostKeyChecking=accept-new)
[ -n "$IDENTITY" ] && SSH+=(-i "$IDENTITY" -o IdentitiesOnly=yes)
[ -n "$KNOWN" ] && SSH+=(-o UserKnownHostsFile="$KNOWN")
SSH+=("$USER_@$HOST")
rsh() { "${SSH[@]}" "$@"; }

# shellcheck disable=SC2016  # expanded on the board
facts=$(rsh 'echo "arch=$(uname -m)"; echo "home=$HOME";
  echo "py=$(python3 -c "import sys; print(\"%d.%d\" % sys.version_info[:2])" 2>/dev/null)";
  if [ -d /run/systemd/system ]; then echo systemd=1; else echo systemd=0; fi
  if command -v crontab >/dev/null; then echo cron=1; else echo cron=0; fi') || \
  die "cannot log in as $USER_@$HOST:$SSH_PORT (key-based ssh must work: ssh-copy-id first)"
fact() { printf '%s\n' "$facts" | sed -n "s/^$1=//p"; }
ARCH=$(fact arch) PYV=$(fact py) RHOME=$(fact home)
[ "$ARCH" = "$PARCH" ] || die "the board is $ARCH but profile $PNAME is for $PARCH: pick its profile"
case "$PYV" in
  3.1[1-9]) ok "board is $ARCH with Python $PYV" ;;
  "") die "no python3 on the board: install Python >= 3.11 (Debian: apt-get install python3)" ;;
  *) die "the board's Python is $PYV; edgert needs >= 3.11 (Debian 12 / Ubuntu 23.04 or newer)" ;;
esac
PREFIX=${PREFIX:-$RHOME/edgert}

# push SRC_DIR NAME STAMP: copy a directory to PREFIX/NAME unless the board has the same stamp
push() {
  local src=$1 dst=$2 stamp=$3 what=$4
  if [ "$(rsh "cat '$PREFIX/$dst/.stamp' 2>/dev/null" || true)" = "$stamp" ]; then
    ok "$what unchanged"; return 0; fi
  tar -C "$src" -cf - . | rsh "set -e; mkdir -p '$PREFIX'; rm -rf '$PREFIX/$dst.new';
    mkdir -p '$PREFIX/$dst.new'; tar -C '$PREFIX/$dst.new' -xf -; echo '$stamp' > '$PREFIX/$dst.new/.stamp';
    rm -rf '$PREFIX/$dst'; mv '$PREFIX/$dst.new' '$PREFIX/$dst'"
  did "$what installed in $PREFIX/$dst"
}
hash_dir() { (cd "$1" && find . -type f ! -name .stamp -print0 | sort -z | xargs -0 sha256sum) | sha256sum | cut -c1-16; }

# ---- 2. runtime wheels (controller-side pip, for the board's platform) ------------------------
WHEELS="numpy==2.4.6 pyzmq==27.3.0 apache-tvm==0.27.0.post1 apache-tvm-ffi==0.1.14.post1 safetensors==0.8.0 psutil==7.2.2 typing_extensions==4.16.0"
tag="$ARCH-cp${PYV/./}"
SITE_CACHE=${EDGERT_BOARD_SITE:-$HOME/.cache/edgert/board-site}/$tag
recipe="v1|$tag|$WHEELS"
if [ "$(cat "$SITE_CACHE/.recipe" 2>/dev/null)" != "$recipe" ]; then
  say "fetching the runtime wheels for $tag on the controller (once)"
  rm -rf "$SITE_CACHE" && mkdir -p "$SITE_CACHE"
  # shellcheck disable=SC2086  # one word per requirement
  env -u PIP_FIND_LINKS "$PY" -m pip install -q --no-compile --no-deps --only-binary=:all: \
    --platform "manylinux_2_28_$ARCH" --platform "manylinux2014_$ARCH" --python-version "$PYV" \
    --implementation cp --abi "cp${PYV/./}" --abi abi3 --target "$SITE_CACHE" $WHEELS \
    >"$SITE_CACHE.log" 2>&1 || { cat "$SITE_CACHE.log" >&2; die "pip could not fetch the wheels"; }
  rm -f "$SITE_CACHE/tvm/lib/libtvm_compiler.so"   # boards run TVM's runtime only
  echo "$recipe" > "$SITE_CACHE/.recipe"
fi
push "$SITE_CACHE" site "$recipe" "runtime wheels ($tag: numpy, pyzmq, TVM runtime, tvm-ffi, safetensors, psutil)"

# ---- 3. edgert (board part), profile, keys ----------------------------------------------------
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/src" "$stage/conf/profiles" "$stage/conf/keys/public" "$stage/conf/keys/private"
(cd "$REPO" && find edgert -name '*.py' -print0 | tar --null -T - -cf -) | tar -C "$stage/src" -xf -
push "$stage/src" src "$(hash_dir "$stage/src")" "edgert package (board part)"
cp "$PPATH" "$stage/conf/profiles/$PNAME.toml"
cp "$KEYS"/public/*.key "$stage/conf/keys/public/"
cp "$KEYS/private/$NAME.key_secret" "$stage/conf/keys/private/"
chmod 700 "$stage/conf/keys/private" && chmod 600 "$stage/conf/keys/private/$NAME.key_secret"
push "$stage/conf" conf "$(hash_dir "$stage/conf")" "profile $PNAME and the cluster's keys (secret of $NAME only)"

# ---- 4. the start script and the boot hook -----------------------------------------------------
cat > "$stage/edgert-board" <<EOF
#!/bin/sh
# $NAME's edgert daemon (installed by boards/provision.sh). Usage: edgert-board start|stop|status|run|probe
P='$PREFIX'
export PYTHONPATH="\$P/site:\$P/src" PYTHONNOUSERSITE=1
pidf="\$P/run/board.pid"; logf="\$P/log/board.log"
alive() { [ -f "\$pidf" ] && kill -0 "\$(cat "\$pidf")" 2>/dev/null; }
case "\${1:-}" in
  run) exec python3 -m edgert serve --name '$NAME' --board "\$P/conf/profiles/$PNAME.toml" \\
         --keys "\$P/conf/keys" --workdir "\$P/work" ;;
  start)
    if alive; then echo "running pid \$(cat "\$pidf")"; grep -h 'listening' "\$logf" | tail -1; exit 0; fi
    mkdir -p "\$P/run" "\$P/log" "\$P/work"; [ -f "\$logf" ] && mv "\$logf" "\$logf.1"
    setsid "\$0" run </dev/null >"\$logf" 2>&1 &
    echo \$! > "\$pidf"
    i=0; while [ \$i -lt 300 ]; do
      if grep -q 'listening' "\$logf"; then echo "started pid \$(cat "\$pidf")"; grep -h 'listening' "\$logf"; exit 0; fi
      alive || { echo "the daemon exited:"; tail -5 "\$logf"; exit 1; }
      sleep 0.5; i=\$((i + 1)); done
    echo "no endpoint after 150 s; see \$logf"; exit 1 ;;
  stop) if alive; then kill "\$(cat "\$pidf")"; fi; rm -f "\$pidf" ;;
  status) if alive; then echo "running pid \$(cat "\$pidf")"; else echo stopped; exit 3; fi ;;
  probe) exec python3 -m edgert.backends ;;
  *) echo "usage: \$0 start|stop|status|run|probe"; exit 2 ;;
esac
EOF
chmod 755 "$stage/edgert-board"
mkdir -p "$stage/bin" && mv "$stage/edgert-board" "$stage/bin/"
push "$stage/bin" bin "$(hash_dir "$stage/bin")" "start script $PREFIX/bin/edgert-board"

if [ "$(fact systemd)" = 1 ]; then
  unit="[Unit]
Description=edgert board daemon ($NAME)
After=network-online.target
[Service]
ExecStart=$PREFIX/bin/edgert-board run
Restart=on-failure
[Install]
WantedBy=default.target"
  if [ "$USER_" = root ]; then udir=/etc/systemd/system sc="systemctl"; else
    udir="$RHOME/.config/systemd/user" sc="systemctl --user"; fi
  if [ "$(rsh "cat '$udir/edgert-$NAME.service' 2>/dev/null" || true)" = "$unit" ]; then
    ok "systemd unit edgert-$NAME.service unchanged"
  else
    printf '%s\n' "$unit" | rsh "mkdir -p '$udir' && cat > '$udir/edgert-$NAME.service' && $sc daemon-reload && $sc enable edgert-$NAME.service"
    did "systemd unit $udir/edgert-$NAME.service enabled"
  fi
  [ "$USER_" = root ] || miss "boot start of a user unit needs lingering: sudo loginctl enable-linger $USER_"
elif [ "$(fact cron)" = 1 ]; then
  line="@reboot $PREFIX/bin/edgert-board start"
  if rsh "crontab -l 2>/dev/null" | grep -qxF "$line"; then ok "crontab @reboot entry unchanged"
  else rsh "(crontab -l 2>/dev/null; echo '$line') | crontab -"; did "crontab @reboot entry added"; fi
else
  miss "boot start: the board has neither systemd nor cron; run $PREFIX/bin/edgert-board start from its init (e.g. /etc/rc.local)"
fi

# ---- 5. backend probe (a child process on the board: a crashing GPU driver cannot hurt) --------
probe=$(rsh "'$PREFIX/bin/edgert-board' probe" 2>/dev/null) || probe=""
if [ -z "$probe" ]; then
  miss "backend probe failed on the board (run $PREFIX/bin/edgert-board probe there to see why)"
else
  res=$(printf '%s' "$probe" | EDGERT_SRC="$REPO" "$PY" -c '
import json, os, sys
sys.path.insert(0, os.environ["EDGERT_SRC"])
from edgert.backends import resolve
use, notes = resolve(sys.argv[1].split(","), json.load(sys.stdin))
print("use " + ",".join(use))
for n in notes: print("note " + n)' "$PBACKENDS")
  ok "backends usable on the board: $(printf '%s\n' "$res" | sed -n 's/^use //p')"
  while IFS= read -r n; do [ -n "$n" ] && miss "$n"; done < <(printf '%s\n' "$res" | sed -n 's/^note //p')
fi

# ---- 6. start and register ------------------------------------------------------------------------
if [ "$START" = 1 ]; then
  out=$(rsh "'$PREFIX/bin/edgert-board' start") || die "the daemon did not start: $out"
  case "$out" in started*) did "daemon ${out%%$'\n'*}" ;; *) ok "daemon already ${out%%$'\n'*}" ;; esac
  ep=$(printf '%s\n' "$out" | sed -n 's/.*listening //p' | tail -1)
  ep="tcp://$HOST:${ep##*:}"            # the bind address (0.0.0.0) as the controller reaches it
  reg=$("$PY" - "$REGISTRY" "$NAME" "$ep" "$PNAME" "$ARCH" "$PREFIX" <<'PY'
import json, sys
from pathlib import Path
path, name, ep, prof, arch, prefix = sys.argv[1:]
p = Path(path)
reg = json.loads(p.read_text()) if p.is_file() else {}
entry = {"endpoint": ep, "profile": prof, "arch": arch, "prefix": prefix}
if reg.get(name) == entry:
    print("same")
else:
    reg[name] = entry
    p.write_text(json.dumps(reg, indent=1, sort_keys=True) + "\n")
    print("new")
PY
)
  if [ "$reg" = same ]; then ok "registered $NAME at $ep in $REGISTRY"; else did "registered $NAME at $ep in $REGISTRY"; fi
fi
say "board $NAME: $changed change(s), $missing missing"
