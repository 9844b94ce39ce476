#!/usr/bin/env bash
# quicktrain's two entry points: `./dev.sh demo` and `./dev.sh test`.
# Both create .venv/ at the repository root on first use and reuse it afterwards (re-installing only when
# pyproject.toml changed), and install Debian's Fashion-MNIST and Chromium packages where apt-get can.
set -euo pipefail
cd "$(dirname "$0")"

# Debian packages that tests use (Fashion-MNIST files; Chromium to check that HTML reports render).
apt_install() {
    command -v apt-get >/dev/null || { echo "dev.sh: no apt-get; install $* by hand" >&2; return 0; }
    local sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo -n"
    $sudo apt-get install -y -qq "$@" >/dev/null 2>&1 \
        || { $sudo apt-get update -qq >/dev/null 2>&1 && $sudo apt-get install -y -qq "$@" >/dev/null 2>&1; } \
        || echo "dev.sh: could not install $*; the tests that need it will say how to get it" >&2
}

setup() {
    if [ ! -x .venv/bin/python ]; then
        python3.11 -m venv .venv
    fi
    local stamp=.venv/.quicktrain-installed
    if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
        echo "dev.sh: installing quicktrain and its dependencies into .venv (log: .venv/install.log)" >&2
        .venv/bin/python -m pip install --disable-pip-version-check -e ".[test,export,tensorboard]" >.venv/install.log 2>&1 \
            || { tail -n 30 .venv/install.log >&2; exit 1; }
        touch "$stamp"
    fi
    [ -d /usr/share/datasets/fashion-mnist ] || apt_install dataset-fashion-mnist
}

test_setup() {
    setup
    command -v chromium >/dev/null || command -v chromium-browser >/dev/null || apt_install chromium fonts-liberation
}

case "${1:-}" in
    demo) setup; shift; exec .venv/bin/quicktrain demo "$@" ;;
    test) test_setup; shift; exec .venv/bin/python -m pytest "$@" ;;
    *) echo "usage: ./dev.sh demo|test [extra arguments]" >&2; exit 2 ;;
esac
