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

# Debian packages: FFmpeg 5.1 libraries for torchcodec (decoding LeRobot videos) and Mesa EGL for
# MuJoCo's offscreen renderer (MetaWorld). Checked with ldconfig, so the fast path stays fast.
APT_PACKAGES="libavcodec59 libavformat59 libavutil57 libswscale6 libswresample4 libavdevice59 libavfilter8 \
libegl1 libegl-mesa0 libgl1-mesa-dri libgbm1 libopengl0"

system_libs() {
    if ldconfig -p | grep -q 'libavcodec.so.59 ' && ldconfig -p | grep -q 'libavfilter.so.8 ' \
        && ldconfig -p | grep -q 'libEGL_mesa.so.0 ' && ldconfig -p | grep -q 'libOpenGL.so.0 ' && ldconfig -p | grep -q 'libgbm.so.1 '; then
        return 0
    fi
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
        echo "[setup] installing system libraries: $APT_PACKAGES" >&2
        apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $APT_PACKAGES >/dev/null
    else
        echo "[setup] missing system libraries; please run: sudo apt-get install -y $APT_PACKAGES" >&2
        return 1
    fi
}

setup() {
    system_libs
    # The stamp records a hash of everything that decides what gets installed; when it matches,
    # setup is a no-op (a second run takes well under a second).
    local want
    want=$(cat pyproject.toml run.sh | sha256sum | cut -d' ' -f1)
    if [[ -x "$PY" && -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
        return 0
    fi
    echo "[setup] creating $VENV (first time: a few minutes; torch is taken from this disk)" >&2
    [[ -x "$PY" ]] || python3.11 -m venv "$VENV" 2>/dev/null || python3 -m venv "$VENV"
    # (pip's warnings about this machine's local package mirrors are noise: filtered)
    local pip=(pip_quiet "$PY" -m pip install --disable-pip-version-check -q)
    "${pip[@]}" --upgrade pip setuptools wheel
    # Pin torch first: anything that lets pip choose "the newest torch" downloads GBs of CUDA wheels.
    "${pip[@]}" torch==2.14.1 torchvision==0.29.1
    # deepspeed builds from an sdist that imports torch at build time. Its CPU ops (shared-memory
    # collectives, CPUAdam for ZeRO-Offload) are compiled here (~2 min), else the first
    # deepspeed.initialize of every run JIT-compiles them (~50 s, ~90 s). A deepspeed installed without
    # them is rebuilt (--no-cache-dir: a cached wheel would be the one without ops).
    if ! "$PY" -c "import deepspeed" >/dev/null 2>&1; then
        (export DS_BUILD_OPS=0 DS_BUILD_SHM_COMM=1 DS_BUILD_CPU_ADAM=1
         "${pip[@]}" --no-build-isolation --no-cache-dir deepspeed==0.19.8)
    elif ! "$PY" -c "from deepspeed.git_version_info import installed_ops as o
raise SystemExit(0 if all(o.get(k, True) for k in ('deepspeed_shm_comm', 'cpu_adam')) else 1)" >/dev/null 2>&1; then
        (export DS_BUILD_OPS=0 DS_BUILD_SHM_COMM=1 DS_BUILD_CPU_ADAM=1
         "${pip[@]}" --no-build-isolation --no-cache-dir --force-reinstall --no-deps deepspeed==0.19.8)
    fi
    # lerobot 0.4.4's own pins conflict with torch 2.14: install it without deps (its needs are in pyproject).
    "${pip[@]}" --no-deps lerobot==0.4.4
    "${pip[@]}" -e ".[test,sim]"
    echo "$want" > "$STAMP"
    echo "[setup] done" >&2
}

# pip's noise here: warnings about this machine's local mirrors, setuptools deprecations, and the
# resolver's complaint about lerobot's own pins (expected: lerobot is installed with --no-deps).
pip_quiet() {
    "$@" 2> >(grep -vE "is ignored: it is neither a file nor a directory|BuildBackendWarning|^\s*!!|\*\*\*|corresp\(dist|^\s*$|^lerobot 0\.4\.4 requires|dependency resolver does not currently" >&2)
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
