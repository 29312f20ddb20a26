#!/usr/bin/env bash
# ComfyUI-HERO developer entry point. Works on a fresh machine (Python 3.11, pip, PyPI access).
#   scripts/dev.sh demo [args]   set up .venv, run the HERO demo on the embedded toy model
#   scripts/dev.sh test          set up, run engine tests, then host + browser tests if a ComfyUI
#                                host is at $COMFYUI_PATH (default ~/comfy/ComfyUI)
#   scripts/dev.sh bench [args]  the feedback-efficiency benchmark
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY=${PYTHON:-python3}
VENV="$ROOT/.venv"

log() { printf '[hero] %s\n' "$*" >&2; }

setup_engine() {
  if [ ! -x "$VENV/bin/python" ]; then
    log "creating $VENV"
    "$PY" -m venv "$VENV"
  fi
  if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    log "installing torch 2.13.0 (CPU)"
    "$VENV/bin/pip" install -q torch==2.13.0
  fi
  if ! "$VENV/bin/python" -c "import diffusers, peft, safetensors, numpy, PIL, pytest, matplotlib" 2>/dev/null; then
    log "installing requirements-dev.txt (demo, bench, tests)"
    "$VENV/bin/pip" install -q -r requirements.txt -r requirements-dev.txt
  fi
}

COMFYUI_PATH="${COMFYUI_PATH:-$HOME/comfy/ComfyUI}"
COMFYUI_OLD_PATH="${HERO_COMFYUI_OLD_PATH:-$HOME/comfy/ComfyUI-0.3.64}"
HOST_VENV="${HERO_HOST_VENV:-$HOME/comfy/venv}"

setup_host() {
  if [ ! -x "$HOST_VENV/bin/python" ]; then
    log "creating host venv $HOST_VENV"
    "$PY" -m venv "$HOST_VENV"
  fi
  if ! "$HOST_VENV/bin/python" -c "import torch, torchvision" 2>/dev/null; then
    log "installing torch 2.14.1 + torchvision 0.29.1 for the ComfyUI host"
    "$HOST_VENV/bin/pip" install -q torch==2.14.1 torchvision==0.29.1
  fi
  local fe
  fe=$(grep -E '^comfyui-frontend-package' "$COMFYUI_PATH/requirements.txt" | head -1)
  # read pip's answer whole first: 'pip show | grep -q' under pipefail fails when grep stops early
  local fe_have
  fe_have=$("$HOST_VENV/bin/pip" show comfyui_frontend_package 2>/dev/null || true)
  if ! "$HOST_VENV/bin/python" -c "import torchsde, av, aiohttp, playwright, diffusers, peft, comfy_kitchen" 2>/dev/null \
     || ! grep -q "Version: ${fe#*==}" <<< "$fe_have"; then
    log "installing ComfyUI requirements into the host venv"
    grep -vE '^(torch|torchvision|torchaudio)\b' "$COMFYUI_PATH/requirements.txt" > "$HOST_VENV/comfy-req.txt"
    "$HOST_VENV/bin/pip" install -q -r "$HOST_VENV/comfy-req.txt" torchsde \
        -r requirements.txt -r requirements-dev.txt playwright
  fi
  if [ -d "$COMFYUI_OLD_PATH" ]; then
    local old_fe old_dir
    old_fe=$(grep -E '^comfyui-frontend-package' "$COMFYUI_OLD_PATH/requirements.txt" | head -1)
    old_dir="$(dirname "$COMFYUI_OLD_PATH")/frontend-${old_fe#*==}"
    if [ ! -d "$old_dir/comfyui_frontend_package/static" ]; then
      log "installing $old_fe for the 0.3.64 host into $old_dir"
      "$HOST_VENV/bin/pip" install -q --no-deps --target "$old_dir" "$old_fe"
    fi
    export HERO_OLD_FRONTEND_ROOT="$old_dir/comfyui_frontend_package/static"
  fi
  if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      log "installing Debian chromium for the browser tests"
      (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1 \
        || log "could not install chromium; browser tests will be SKIPPED"
    fi
  fi
}

run_pytest() {  # pytest exit 5 (no tests collected) counts as failure: CI must run tests
  "$@" || { rc=$?; [ $rc -eq 5 ] && log "no tests collected"; return $rc; }
}

cmd="${1:-test}"; shift || true
case "$cmd" in
  demo)
    setup_engine
    exec "$VENV/bin/python" -m hero_engine demo "$@" ;;
  bench)
    setup_engine
    exec "$VENV/bin/python" -m hero_engine bench "$@" ;;
  test)
    setup_engine
    log "engine tests"
    run_pytest "$VENV/bin/python" -m pytest -q tests/engine "$@"
    if [ -f "$COMFYUI_PATH/main.py" ]; then
      setup_host
      export COMFYUI_PATH HERO_COMFYUI_OLD_PATH="$COMFYUI_OLD_PATH"
      if [ ! -f "$COMFYUI_OLD_PATH/main.py" ]; then
        echo "SKIPPED host tests on ComfyUI 0.3.64: no host at $COMFYUI_OLD_PATH"
      fi
      log "host + browser tests against $COMFYUI_PATH"
      run_pytest "$HOST_VENV/bin/python" -m pytest -q tests/host tests/browser "$@"
    else
      echo "================================================================"
      echo "SKIPPED host tests: no ComfyUI at COMFYUI_PATH=$COMFYUI_PATH"
      echo "SKIPPED browser tests: they need the ComfyUI host too"
      echo "================================================================"
    fi ;;
  *) echo "usage: scripts/dev.sh demo|test|bench [args]" >&2; exit 2 ;;
esac
