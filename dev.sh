#!/usr/bin/env bash
# The README's two commands, for a fresh Debian 12 machine, as root:
#   ./dev.sh demo   install what is needed, then run the demo (nichooks try)
#   ./dev.sh test   install what is needed, then run the whole test suite
# Both are safe to re-run: installing is skipped when everything is there.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
venv="$here/.venv"
debs=(python3 python3-venv iproute2 iputils-ping procps kmod openvswitch-switch qemu-system-x86 strace
      nftables python3-nftables)

need_root() {
    if [ "$(id -u)" != 0 ]; then
        echo "dev.sh: run as root (the demo and the tests create network namespaces)" >&2
        exit 2
    fi
}

install_debs() {
    local missing=()
    for pkg in "${debs[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
            || missing+=("$pkg")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "dev.sh: installing Debian packages: ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -q
        apt-get install -y -q --no-install-recommends "${missing[@]}"
    fi
}

install_venv() {
    # Debian's own interpreter, by absolute path: the hooks' shebangs will name it.
    if [ ! -x "$venv/bin/python" ]; then
        /usr/bin/python3 -m venv "$venv"
    fi
    if ! "$venv/bin/python" -c 'import nichooks, pyroute2, ovs, filelock, daemon, pytest, pytest_subprocess, hypothesis' 2>/dev/null \
        || [ "$here/setup.cfg" -nt "$venv/.installed" ]; then
        "$venv/bin/pip" install -q --disable-pip-version-check -e "$here[test]"
        touch "$venv/.installed"
    fi
}

case "${1:-}" in
    demo)
        need_root; install_debs; install_venv
        exec "$venv/bin/nichooks" try
        ;;
    test)
        need_root; install_debs; install_venv
        cd "$here"
        "$venv/bin/ruff" check nichooks tests bin bench
        "$venv/bin/mypy" nichooks
        shift
        exec "$venv/bin/python" -m pytest "$@"
        ;;
    *)
        echo "usage: ./dev.sh demo | ./dev.sh test [pytest args]" >&2
        exit 2
        ;;
esac
