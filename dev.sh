#!/usr/bin/env bash
# quicktrain's two entry points: `./dev.sh demo` and `./dev.sh test`.
# Both create .venv/ at the repository root on first use and reuse it afterwards (re-installing only when
# pyproject.toml changed), and install Debian's Fashion-MNIST package where apt-get can.
set -euo pipefail
cd "$(dirname "$0")"

setup() {
    if [ ! -x .venv/bin/python ]; then
        python3.11 -m venv .venv
    fi
    local stamp=.venv/.quicktrain-installed
    if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
        .venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[test,export]"
        touch "$stamp"
    fi
    if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null; then
        local sudo=""
        [ "$(id -u)" = 0 ] || sudo="sudo -n"
        { $sudo apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 \
            || { $sudo apt-get update -qq >/dev/null 2>&1 && $sudo apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1; }; } \
            || echo "dev.sh: could not install dataset-fashion-mnist; fashion-mnist tests will say how to get it" >&2
    fi
}

case "${1:-}" in
    demo) setup; shift; exec .venv/bin/quicktrain demo "$@" ;;
    test) setup; shift; exec .venv/bin/python -m pytest "$@" ;;
    *) echo "usage: ./dev.sh demo|test [extra arguments]" >&2; exit 2 ;;
esac
