#!/usr/bin/env bash
# Install what agentwarden needs on this machine (idempotent), then run it.
#
#   deploy/setup.sh daemon   install, then run the daemon in the foreground
#   deploy/setup.sh test     install, then run the checks and the whole test suite
#   deploy/setup.sh install  install only
#
# Root on Debian 12 (and Ubuntu 22.04+, where the exact linux-headers-$(uname -r)
# package exists and is used). Environment: AGENTWARDEN_VENV (default
# /opt/agentwarden/venv), AGENTWARDEN_CONFIG (default /etc/agentwarden/config.yaml).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${AGENTWARDEN_VENV:-/opt/agentwarden/venv}
CONFIG=${AGENTWARDEN_CONFIG:-/etc/agentwarden/config.yaml}
export DEBIAN_FRONTEND=noninteractive

say() { printf '\033[1m[setup]\033[0m %s\n' "$*" >&2; }

[ "$(id -u)" = 0 ] || { echo "deploy/setup.sh: run as root (it installs packages and loads eBPF)" >&2; exit 1; }

APT_UPDATED=
apt_install() {
    local missing=()
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ -z "$APT_UPDATED" ]; then apt-get update -qq; APT_UPDATED=1; fi
    say "apt-get install ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

packages() {
    # bcc from the distribution; util-linux/login/sudo/tmux for su, setpriv, sudo and the
    # multiplexer used by the tests;
    # PostgreSQL (server, psql, pgbench) for the tests and benchmarks of the SQL capture;
    # tshark: Wireshark's dissectors read the pcap a session is exported as (tests)
    apt_install python3-bpfcc python3-venv python3-dev gcc util-linux login procps nftables \
        python3-nftables postgresql postgresql-client openssl curl nodejs sudo tmux busybox systemd tshark
}

kernel_headers() {
    # bcc compiles its C at load time against /lib/modules/$(uname -r)/build.
    local k; k=$(uname -r)
    [ -e "/lib/modules/$k/build/include" ] && return 0
    if apt-cache show "linux-headers-$k" >/dev/null 2>&1; then
        apt_install "linux-headers-$k"
        [ -e "/lib/modules/$k/build/include" ] && return 0
    fi
    # No headers package for this kernel (custom or newer kernel): use the
    # distribution's nearest. Probes take no struct layout from these headers: the
    # structs they read are read at offsets from the running kernel's BTF (probes/btf.py).
    local arch; arch=$(dpkg --print-architecture)
    apt_install "linux-headers-$arch"
    local build; build=$(ls -d /usr/src/linux-headers-*-"$arch" 2>/dev/null | sort -V | tail -n 1)
    [ -n "$build" ] || { echo "no linux headers found under /usr/src" >&2; exit 1; }
    mkdir -p "/lib/modules/$k"
    ln -sfn "$build" "/lib/modules/$k/build"
    ln -sfn "${build%-"$arch"}-common" "/lib/modules/$k/source"
    say "kernel $k: using headers $build"
}

mounts() {
    mountpoint -q /sys/kernel/tracing || mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null || true
    mountpoint -q /sys/kernel/debug || mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null || true
}

venv() {
    if [ ! -x "$VENV/bin/python" ]; then
        say "creating $VENV (from /usr/bin/python3, with system site packages for bcc)"
        mkdir -p "$(dirname "$VENV")"
        /usr/bin/python3 -m venv --system-site-packages "$VENV"
    fi
    local stamp="$VENV/.agentwarden-installed"
    local want; want=$(cat "$REPO/pyproject.toml" | sha256sum | cut -d' ' -f1)":$REPO"
    if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
        say "pip install -e $REPO[test]"
        "$VENV/bin/pip" install -q --upgrade pip
        "$VENV/bin/pip" install -q -e "$REPO[test]"
        echo "$want" > "$stamp"
    fi
}

group_and_config() {
    getent group agentwarden >/dev/null || groupadd --system agentwarden
    if [ ! -f "$CONFIG" ] && [ "$CONFIG" = /etc/agentwarden/config.yaml ]; then
        install -D -m 0640 -g agentwarden "$REPO/deploy/config.yaml" "$CONFIG"
        say "wrote default config $CONFIG"
    fi
    if [ ! -f /etc/agentwarden/policy.yaml ]; then
        install -D -m 0644 "$REPO/deploy/policy.yaml" /etc/agentwarden/policy.yaml
        say "wrote the default policy /etc/agentwarden/policy.yaml"
    fi
}

# mypy on the packages as they are imported (agentwarden.<folder>).  Run on the folders themselves,
# every `from agentwarden...` import resolved to Any (an editable install is a finder mypy does not
# follow), so no type crossed a module boundary; a layout of symlinks gives mypy the real names.
typecheck() {
    local layout
    layout=$(mktemp -d)
    mkdir "$layout/agentwarden"
    for pkg in probes core daemon enforce cli; do ln -s "$REPO/$pkg" "$layout/agentwarden/$pkg"; done
    local rc=0
    (cd "$layout" && MYPYPATH="$layout" "$VENV/bin/mypy" --config-file "$REPO/pyproject.toml" --strict \
        --no-error-summary --namespace-packages --explicit-package-bases --cache-dir "$layout/.cache" \
        -p agentwarden.probes -p agentwarden.core -p agentwarden.daemon -p agentwarden.enforce \
        -p agentwarden.cli) || rc=$?
    rm -rf "$layout"
    return "$rc"
}

# The providers' npm client libraries, for the tests' Node agent loop (tests/test_e2e_llm.py finds them
# at $VENV/npm/node_modules), at the versions the tests were written against.
NPM_TEST_PACKAGES=("@anthropic-ai/sdk@1.14.0" "openai@6.49.0")
npm_test_packages() {
    command -v npm >/dev/null || apt_install npm
    local stamp="$VENV/npm/.installed"
    [ -f "$stamp" ] && [ "$(cat "$stamp")" = "${NPM_TEST_PACKAGES[*]}" ] && return 0
    say "npm install ${NPM_TEST_PACKAGES[*]} (tests)"
    mkdir -p "$VENV/npm"
    npm install --prefix "$VENV/npm" --no-audit --no-fund --silent "${NPM_TEST_PACKAGES[@]}"
    echo "${NPM_TEST_PACKAGES[*]}" > "$stamp"
}

install_all() { packages; kernel_headers; mounts; venv; group_and_config; }

unit() {
    # the systemd unit: installed, enabled and started (or restarted) where systemd runs
    local dst=/etc/systemd/system/agentwarden.service
    install -m 0644 "$REPO/deploy/systemd/agentwarden.service" "$dst"
    if [ -d /run/systemd/system ]; then
        say "systemctl enable --now agentwarden"
        systemctl daemon-reload
        systemctl enable agentwarden >/dev/null 2>&1
        systemctl restart agentwarden
        systemctl --no-pager --lines=0 status agentwarden || true
    else
        say "systemd is not running here: $dst is installed, not started"
    fi
}

cmd=${1:-}
shift || true
case "$cmd" in
    install) install_all; unit ;;
    daemon)
        install_all
        exec "$VENV/bin/agentwarden" daemon --config "$CONFIG" "$@" ;;
    test)
        install_all
        npm_test_packages
        cd "$REPO"
        say "ruff"; "$VENV/bin/ruff" check .
        say "mypy --strict"; typecheck
        say "pytest"
        set +e
        "$VENV/bin/python" -m pytest "$@"
        rc=$?
        set -e
        # pytest's 5 means no test ran: that proves nothing, so it fails too
        [ "$rc" = 5 ] && echo "pytest collected no tests" >&2
        exit "$rc" ;;
    *) echo "usage: deploy/setup.sh {install|daemon|test} [args]" >&2; exit 2 ;;
esac
