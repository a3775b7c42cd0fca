#!/usr/bin/env bash
# Optional (`make suffix`): vLLM's suffix speculation (speculative method "suffix"), for
# `vllm-utio bench-spec --engines suffix`. vLLM imports arctic_inference.suffix_decoding,
# Snowflake's suffix tree (C++, bound with nanobind). The arctic-inference package would
# also register a vLLM plugin that patches vLLM in every engine, vanilla included, and
# its build pulls a CUDA torch; so only the suffix-tree module is built, from the
# package's pinned source release, and put into the virtualenv without the package's
# entry points. 16 s here; needs cmake and a C++20 compiler.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${UTIO_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"
VERSION=0.3.0
NANOBIND=2.9.2  # the version arctic-inference 0.3.0 builds with

if "$PY" -c "import arctic_inference.suffix_decoding" 2>/dev/null; then
  echo "[suffix] arctic_inference.suffix_decoding is installed"
  exit 0
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
echo "[suffix] building arctic-inference $VERSION's suffix tree ..."
# --no-build-isolation: reading the source release's metadata runs its setup.py, which
# imports torch; an isolated build environment would download a CUDA torch for it
"$PY" -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: \
  --no-build-isolation "arctic-inference==$VERSION" -d "$work"
tar -xzf "$work/arctic_inference-$VERSION.tar.gz" -C "$work"
src="$work/arctic_inference-$VERSION"
"$PY" -m pip install -q --disable-pip-version-check --target "$work/nanobind" \
  "nanobind==$NANOBIND"
PYTHONPATH="$work/nanobind" cmake -S "$src/csrc/suffix_decoding" -B "$work/build" \
  -DPython_EXECUTABLE="$PY" -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_LIBRARY_OUTPUT_DIRECTORY="$work/lib" > "$work/cmake.log" \
  || { cat "$work/cmake.log"; exit 1; }
cmake --build "$work/build" -j 2 > "$work/build.log" || { cat "$work/build.log"; exit 1; }

site="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
dest="$site/arctic_inference/suffix_decoding"
mkdir -p "$dest"
cp "$src/arctic_inference/__init__.py" "$site/arctic_inference/"
cp "$src/arctic_inference/suffix_decoding/__init__.py" \
  "$src/arctic_inference/suffix_decoding/cache.py" "$dest/"
cp "$work"/lib/_C*.so "$dest/"
"$PY" -c "from arctic_inference.suffix_decoding import SuffixDecodingCache"
echo "[suffix] installed into $site/arctic_inference"
