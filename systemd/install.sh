#!/bin/sh
# Install packratd as a systemd service (run as root):
#   - the packratd system user and group (clients join the group to reach the socket),
#   - /etc/packratd/packratd.toml (never overwritten once there),
#   - /etc/systemd/system/packratd.service with ExecStart pointing at the packratd to run,
#     and docs/operations.md as /usr/share/doc/packratd/operations.md,
#   - when the Python interpreter, venv or package lives under /home, /root or /run/user (hidden
#     by ProtectHome=), a drop-in that bind-mounts exactly those directories read-only.
#
#   systemd/install.sh [--bin PATH] [--model PATH] [--config FILE] [--unit-dir DIR] [--enable] [--start]
#
#   --bin PATH      packratd to run (default: the checkout's .venv/bin/packratd, else `command -v packratd`)
#   --model PATH    set model.path in a newly installed config (absolute path, readable by packratd)
#   --config FILE   install FILE as /etc/packratd/packratd.toml (default: the checkout's
#                   etc/packratd/packratd.toml, else `packratd --dump-config`: every option, commented);
#                   only when no config is installed yet, unless --force-config
#   --unit-dir DIR  where the unit goes (default /etc/systemd/system)
#   --enable        systemctl enable packratd;   --start: systemctl restart packratd
#
# Environment: DESTDIR is not supported on purpose: this installs a user and talks to systemd.
set -eu

REPO=$(cd "$(dirname "$0")/.." && pwd)
BIN=""
MODEL=""
CONFIG_SRC=""
FORCE_CONFIG=0
UNIT_DIR=/etc/systemd/system
CONF_DIR=/etc/packratd
ENABLE=0
START=0
USER_NAME=packratd

die() { echo "install.sh: $*" >&2; exit 1; }
warn() { echo "install.sh: warning: $*" >&2; }

while [ $# -gt 0 ]; do
    case "$1" in
        --bin) BIN=$2; shift 2 ;;
        --model) MODEL=$2; shift 2 ;;
        --config) CONFIG_SRC=$2; shift 2 ;;
        --force-config) FORCE_CONFIG=1; shift ;;
        --unit-dir) UNIT_DIR=$2; shift 2 ;;
        --enable) ENABLE=1; shift ;;
        --start) START=1; shift ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
done

[ "$(id -u)" = 0 ] || die "run as root (it creates a system user and installs a unit)"
if [ -z "$BIN" ]; then
    if [ -x "$REPO/.venv/bin/packratd" ]; then BIN="$REPO/.venv/bin/packratd"
    else BIN=$(command -v packratd || true); fi
fi
[ -n "$BIN" ] && [ -x "$BIN" ] || die "no packratd executable (give --bin PATH; \`make install\` builds .venv)"
case "$BIN" in /*) ;; *) BIN="$(cd "$(dirname "$BIN")" && pwd)/$(basename "$BIN")" ;; esac
GEN_CONFIG=""
if [ -z "$CONFIG_SRC" ]; then
    CONFIG_SRC="$REPO/etc/packratd/packratd.toml"
    if [ ! -f "$CONFIG_SRC" ]; then
        GEN_CONFIG=$(mktemp)
        trap 'rm -f "$GEN_CONFIG"' EXIT
        "$BIN" --dump-config > "$GEN_CONFIG" || die "$BIN --dump-config failed"
        CONFIG_SRC=$GEN_CONFIG
    fi
fi
[ -f "$CONFIG_SRC" ] || die "config $CONFIG_SRC not found"
if [ -n "$MODEL" ]; then
    case "$MODEL" in /*) ;; *) die "--model needs an absolute path" ;; esac
    [ -f "$MODEL" ] || die "model $MODEL not found"
fi

# ---- user and group ----------------------------------------------------------------------------
if ! getent group "$USER_NAME" >/dev/null; then
    groupadd --system "$USER_NAME"
    echo "created group $USER_NAME"
fi
if ! getent passwd "$USER_NAME" >/dev/null; then
    nologin=/usr/sbin/nologin; [ -x "$nologin" ] || nologin=/sbin/nologin
    useradd --system --gid "$USER_NAME" --home-dir /var/lib/packratd --no-create-home \
        --shell "$nologin" --comment "packratd model server" "$USER_NAME"
    echo "created user $USER_NAME"
fi

# ---- config -----------------------------------------------------------------------------------
install -d -m 0755 "$CONF_DIR"
CONF="$CONF_DIR/packratd.toml"
if [ -e "$CONF" ] && [ "$FORCE_CONFIG" = 0 ]; then
    echo "kept existing $CONF"
    [ -z "$MODEL" ] || warn "--model ignored: $CONF exists (edit model.path there)"
else
    tmp="$CONF.new.$$"
    if [ -n "$MODEL" ]; then
        # Set model.path: the first "path" key after [model], commented out or not.
        MODEL="$MODEL" awk '
            /^\[/ { sect = $0 }
            sect == "[model]" && !done && /^#?path[ \t]*=/ {
                m = ENVIRON["MODEL"]; gsub(/\\/, "\\\\", m); gsub(/"/, "\\\"", m)
                print "path = \"" m "\""; done = 1; next }
            { print }
            END { if (!done) exit 3 }' "$CONFIG_SRC" > "$tmp" || { rm -f "$tmp"; die "no model.path line in $CONFIG_SRC"; }
    else
        cp "$CONFIG_SRC" "$tmp"
    fi
    chmod 0644 "$tmp"
    mv "$tmp" "$CONF"
    echo "installed $CONF"
fi

# ---- unit -------------------------------------------------------------------------------------
install -d -m 0755 "$UNIT_DIR"
UNIT="$UNIT_DIR/packratd.service"
BIN_SED=$(printf '%s' "$BIN" | sed 's/[&|\\]/\\&/g')
sed "s|^ExecStart=/usr/local/bin/packratd |ExecStart=$BIN_SED |" "$REPO/systemd/packratd.service" > "$UNIT.new.$$"
grep -qF "ExecStart=$BIN " "$UNIT.new.$$" || { rm -f "$UNIT.new.$$"; die "could not set ExecStart in the unit"; }
chmod 0644 "$UNIT.new.$$"
mv "$UNIT.new.$$" "$UNIT"
echo "installed $UNIT (ExecStart=$BIN)"

# the unit's Documentation= points here
if [ -f "$REPO/docs/operations.md" ]; then
    install -D -m 0644 "$REPO/docs/operations.md" /usr/share/doc/packratd/operations.md
fi

# ---- ProtectHome= vs an interpreter under a home directory --------------------------------------
# The unit hides /home, /root and /run/user.  If the interpreter, the venv or the (editable) package
# lives there, bind exactly those directories back, read-only, over an empty tmpfs home.
DROPIN_DIR="$UNIT.d"
DROPIN="$DROPIN_DIR/10-interpreter-paths.conf"
PY=$(head -n 1 "$BIN" | sed -n 's/^#![ \t]*\([^ \t]*\).*/\1/p')
binds=""
if [ -n "$PY" ] && [ -x "$PY" ]; then
    paths=$("$PY" -c 'import os, sys
import packratd
print(os.path.realpath(sys.base_prefix)); print(os.path.realpath(sys.prefix))
print(os.path.dirname(os.path.dirname(os.path.realpath(packratd.__file__))))' 2>/dev/null) \
        || warn "$PY cannot import packratd; is $BIN the right packratd?"
    for p in $paths; do
        case "$p" in /home/*|/root/*|/run/user/*) binds="$binds $p" ;; esac
    done
else
    warn "cannot find the interpreter of $BIN"
fi
if [ -n "$binds" ]; then
    install -d -m 0755 "$DROPIN_DIR"
    {
        echo "# Written by systemd/install.sh: packratd's Python lives under a home directory."
        echo "[Service]"
        echo "ProtectHome=tmpfs"
        echo "BindReadOnlyPaths=$(echo "$binds" | tr ' ' '\n' | sort -u | tr '\n' ' ' | sed 's/^ *//; s/ *$//')"
    } > "$DROPIN"
    chmod 0644 "$DROPIN"
    echo "installed $DROPIN (binds$binds)"
else
    rm -f "$DROPIN"
fi

# ---- can the service user read what it needs? ----------------------------------------------------
as_user() { setpriv --reuid "$USER_NAME" --regid "$USER_NAME" --init-groups -- "$@"; }
if [ -z "$binds" ]; then   # (paths bound by the drop-in are only reachable inside the unit)
    as_user test -x "$BIN" || warn "user $USER_NAME cannot execute $BIN (directory permissions?)"
fi
if [ -n "$MODEL" ]; then
    case "$MODEL" in /home/*|/root/*|/run/user/*) warn "model $MODEL is under a home directory, hidden by ProtectHome=" ;; esac
    as_user test -r "$MODEL" || warn "user $USER_NAME cannot read $MODEL"
fi

# ---- tell systemd ------------------------------------------------------------------------------
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    [ "$ENABLE" = 0 ] || systemctl enable packratd.service
    [ "$START" = 0 ] || systemctl restart packratd.service
else
    warn "systemd is not running here; run systemctl daemon-reload once it is"
fi
echo "done: systemctl start packratd; journalctl -u packratd -f; add clients to group $USER_NAME"
