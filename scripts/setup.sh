#!/usr/bin/env bash
# Installs every Debian package AndyLLM needs (safe to run again: installed packages are
# skipped), then configures and builds build/andyllm with the CMake preset.
#   scripts/setup.sh            # packages + build
#   ANDYLLM_SKIP_BUILD=1 scripts/setup.sh   # packages only
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

PACKAGES=(
  # toolchain
  build-essential cmake ninja-build ccache pkg-config git
  # LibTorch (CPU) with a fast BLAS: without OpenBLAS fp32 matmul runs on reference BLAS
  # (measured 8 vs 210 GFLOP/s on the build machine). Both OpenBLAS builds are installed; the
  # OpenMP one is selected below.
  libtorch-dev libopenblas0-pthread libopenblas0-openmp
  # MPI, HDF5, sentencepiece, TOML++, HTTP + JSON, tests
  libopenmpi-dev openmpi-bin libhdf5-dev hdf5-tools libsentencepiece-dev sentencepiece
  libtomlplusplus-dev libgtest-dev googletest libcpp-httplib-dev nlohmann-json3-dev
  # demo corpus (English text) and plotting
  fortunes fortunes-min gnuplot-nox
  # independent references used by the tests (Debian's python3, not a virtualenv)
  python3 python3-torch python3-h5py python3-sentencepiece python3-numpy
)

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

missing=()
for p in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "[setup] installing ${#missing[@]} Debian packages: ${missing[*]}"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
else
  echo "[setup] all ${#PACKAGES[@]} Debian packages already installed"
fi

# OpenBLAS built on OpenMP must be the BLAS libtorch loads: it runs its threads in the same
# OpenMP pool as LibTorch, where the pthreads build keeps a second pool and the two spin against
# each other with more than one thread per process (measured on 2 cores, one process with 2
# threads: 25 M model fp32 training 459 vs 1,141 tokens/s, decode at concurrency 32 407 vs
# 1,666; docs/PERFORMANCE.md). Debian's alternatives prefer the pthreads build, so select it here.
for lib in libblas.so.3 liblapack.so.3 libopenblas.so.0; do
  name="$lib-x86_64-linux-gnu"
  want=$(update-alternatives --list "$name" 2>/dev/null | grep /openblas-openmp/ | head -1 || true)
  now=$(readlink -f "/usr/lib/x86_64-linux-gnu/$lib" 2>/dev/null || true)
  if [ -z "$want" ]; then
    echo "[setup] warning: no OpenMP OpenBLAS for $lib (now ${now:-none})" >&2
  elif [ "$(readlink -f "$want")" != "$now" ]; then
    echo "[setup] selecting $want for $lib (was: ${now:-none})"
    $SUDO update-alternatives --quiet --set "$name" "$want"
  fi
done
echo "[setup] BLAS: $(readlink -f /usr/lib/x86_64-linux-gnu/libblas.so.3)"

# Node.js packages the tests drive, each pinned by a package-lock.json and installed with
# `npm ci --omit=optional` into a folder of build/ (skipped while its lock is unchanged):
# - tests/serve/openai_node -> build/openai-node: the official openai client, for the serve e2e
#   suite (tests/serve/openai_node/suite.mjs);
# - tests/formats/node -> build/formats-node: independent readers of the files we export
#   (@huggingface/tokenizers for tokenizer.json, node-llama-cpp), for tests/formats.
# Without Node.js those checks are skipped; the C++ tests still run.
if ! command -v npm >/dev/null 2>&1; then
  echo "[setup] installing Node.js (nodejs npm) for the openai client suite and the format checks"
  $SUDO apt-get update -q || true
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends nodejs npm || true
fi
# npm_install SRC_DIR DEST_DIR WHAT: npm ci of SRC_DIR's package.json + package-lock.json in DEST_DIR.
npm_install() {
  local src="$ANDYLLM_ROOT/$1" dest="$ANDYLLM_ROOT/$2" what="$3"
  mkdir -p "$dest"
  cp "$src/package.json" "$src/package-lock.json" "$dest/"
  if cmp -s "$dest/package-lock.json" "$dest/node_modules/.andyllm-installed-lock.json"; then
    echo "[setup] $what: installed ($2)"
  elif (cd "$dest" && npm ci --omit=optional --no-audit --no-fund --loglevel=error); then
    cp "$dest/package-lock.json" "$dest/node_modules/.andyllm-installed-lock.json"
    echo "[setup] $what: installed ($2)"
  else
    echo "[setup] npm ci failed: the $what checks will be skipped"
  fi
}
if command -v npm >/dev/null 2>&1; then
  npm_install tests/serve/openai_node build/openai-node "openai client for the serve e2e suite"
  npm_install tests/formats/node build/formats-node "format readers (@huggingface/tokenizers, node-llama-cpp)"
else
  echo "[setup] no npm: the openai client suite of the serve e2e test and the format checks (tests/formats) will be skipped"
fi

if [ "${ANDYLLM_SKIP_BUILD:-0}" = 1 ]; then exit 0; fi
cd "$ANDYLLM_ROOT"
echo "[setup] configuring (cmake --preset default)"
cmake --preset default
echo "[setup] building build/andyllm and the tests ($(nproc) cores)"
cmake --build --preset default -j "$(nproc)"
echo "[setup] done: $ANDYLLM_BIN"
