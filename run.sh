#!/usr/bin/env bash
# One entry point for a fresh machine.
#   ./run.sh demo   set up .venv, then generate data, train, evaluate, report (the main job)
#   ./run.sh test   set up .venv, then run the test suite
#   ./run.sh setup  only set up .venv (idempotent; seconds when already done)
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$(pwd)
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
STAMP="$VENV/.vla-setup-stamp"

setup() {
    # The stamp records a hash of everything that decides what gets installed; when it matches,
    # setup is a no-op (a second run takes well under a second).
    local want
    want=$(cat pyproject.toml run.sh | sha256sum | cut -d' ' -f1)
    if [[ -x "$PY" && -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
        return 0
    fi
    echo "[setup] creating $VENV (first time: a few minutes; torch is taken from this disk)" >&2
    [[ -x "$PY" ]] || python3.11 -m venv "$VENV" 2>/dev/null || python3 -m venv "$VENV"
    local pip=("$PY" -m pip install --disable-pip-version-check -q)
    "${pip[@]}" --upgrade pip setuptools wheel
    # Pin torch first: anything that lets pip choose "the newest torch" downloads GBs of CUDA wheels.
    "${pip[@]}" torch==2.14.1 torchvision==0.29.1
    # deepspeed builds from an sdist that imports torch at build time.
    "${pip[@]}" --no-build-isolation deepspeed==0.19.8
    # lerobot 0.4.4's own pins conflict with torch 2.14: install it without deps (its needs are in pyproject).
    "${pip[@]}" --no-deps lerobot==0.4.4
    "${pip[@]}" -e ".[test]"
    echo "$want" > "$STAMP"
    echo "[setup] done" >&2
}

cmd=${1:-}
shift || true
case "$cmd" in
    setup) setup ;;
    demo)
        setup
        exec "$VENV/bin/vla" demo "$@" ;;
    test)
        setup
        export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
        exec "$PY" -m pytest -q "$@" ;;
    *)
        echo "usage: ./run.sh {demo|test|setup} [args...]" >&2
        exit 2 ;;
esac
