#!/usr/bin/env bash
# The GPU evidence in one command, for a lent GPU machine (one H100 / H200 with PyTorch 2.x + CUDA
# installed, no internet, minutes of machine time): build against that machine's LibTorch and NCCL,
# run the `gpu` test label, NCCL collectives, CUDA training (fp32/bf16 against the CPU; bf16 and fp16
# tokens/s and MFU of a GPT-2-small-sized model) and the inference engine on the GPU (greedy tokens
# against the CPU engine's; bench generate). One results file: docs/PERFORMANCE.md quotes it.
#
#   scripts/gpu_suite.sh prepare    # HERE (Debian 12, network): the .debs AndyLLM needs beyond what the
#                                   # GPU machine has, unpacked under .gpu/root (never into /); the
#                                   # datasets and the CPU reference outputs under .gpu/
#   scripts/gpu_suite.sh selfcheck  # HERE: configure + a relocated MPI run against .gpu/root with the
#                                   # system's copies of those packages hidden (a private mount namespace)
#   scripts/gpu_suite.sh run        # THERE: refuses without a GPU; results in $OUT (or .gpu/results)
# .gpu/ is ignored by git; the device tool carries it with `carry: [".gpu"]`.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
G="$ROOT/.gpu"
P="$G/root"
ARCH=x86_64-linux-gnu
# Beyond the GPU machine's image: Open MPI (+ PMIx, hwloc, libevent), HDF5 (+ szip, curl and what curl
# links), sentencepiece, TOML++, cpp-httplib, nlohmann-json, GoogleTest.
DEBS=(libopenmpi-dev openmpi-bin openmpi-common libopenmpi3 libpmix2 libhwloc15 libevent-core-2.1-7
  libevent-pthreads-2.1-7 libnuma1 libltdl7
  libhdf5-dev libhdf5-103-1 libhdf5-cpp-103-1 libhdf5-hl-100 libhdf5-hl-cpp-100 libaec0 libsz2
  libcurl4 libnghttp2-14 libidn2-0 librtmp1 libssh2-1 libpsl5 libgssapi-krb5-2 libkrb5-3 libk5crypto3
  libkrb5support0 libkeyutils1 libcom-err2 libldap-2.5-0 libsasl2-2 libsasl2-modules-db libdb5.3 libzstd1
  libbrotli1 libssl3 libgnutls30 libhogweed6 libnettle8 libgmp10 libp11-kit0 libtasn1-6 libunistring2
  libffi8 libudev1
  libsentencepiece-dev libsentencepiece0 libtomlplusplus-dev libtomlplusplus3 libgtest-dev
  libcpp-httplib-dev libcpp-httplib0.11 nlohmann-json3-dev
  libssl-dev zlib1g-dev libbrotli-dev)  # the headers cpp-httplib includes with the TLS and compression support it was built with

# GPU_SUITE_STEPS (comma list, default all) picks the steps after the build: tests, comm, train,
# generate, hf (the Hugging Face export loaded by transformers), bench_train, fp32res (bench train
# bf16 with the fp32 residual stream of PyTorch autocast instead of the config's bf16 one), unfused
# (bench train with ANDYLLM_FUSED_OPS=0: what the GPU fused ops gain), profile (LibTorch's profiler
# over two steps: GPU time by kernel), pytorch, bench_generate. GPU_SUITE_BATCHES: bench train
# micro-batches (default "16 64": the config's, and the one the best MFU so far came from; the
# profile takes the first); GPU_SUITE_PYTORCH_BATCHES those of the pytorch step (default 16).
want() { [[ ",${GPU_SUITE_STEPS:-tests,comm,train,generate,hf,bench_train,fp32res,unfused,profile,pytorch,bench_generate}," == *",$1,"* ]]; }
# A digest of the source tree as it is on disk (the device tool copies the working tree, whose
# .git may name an older commit): `scripts/gpu_suite.sh digest` here gives the same for a checkout.
source_digest() {
  (cd "$ROOT" && find CMakeLists.txt core parallel data launch serve tests scripts configs \
    \( -path data/demo -o -name __pycache__ \) -prune -o -type f ! -name '*.pyc' -print0 |
    LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -c1-12)
}
say() { echo "[gpu_suite $(date -u +%T)] $*"; }
die() { echo "gpu_suite: $*" >&2; exit 1; }

unpack() {
  [ -d "$G/debs" ] || die "no $G/debs: run 'scripts/gpu_suite.sh prepare' on the build machine first"
  if [ ! -f "$P/.complete" ]; then
    rm -rf "$P" && mkdir -p "$P"
    for f in "$G"/debs/*.deb; do dpkg-deb -x "$f" "$P" || die "cannot unpack $f"; done
    touch "$P/.complete"
  fi
}

# The relocated packages: Open MPI finds its components and help files through OPAL_PREFIX, PMIx
# through PMIX_INSTALL_PREFIX; shared libraries through LD_LIBRARY_PATH (also what ld searches for
# the libraries' own dependencies at link time).
relocated_env() {
  export OPAL_PREFIX="$P/usr"
  export PMIX_INSTALL_PREFIX="$P/usr/lib/$ARCH/pmix2"
  export PMIX_MCA_mca_base_component_path="$P/usr/lib/$ARCH/pmix2/lib/pmix"
  export LD_LIBRARY_PATH="$P/usr/lib/$ARCH:$P/usr/lib/$ARCH/openmpi/lib:$P/usr/lib/$ARCH/pmix2/lib:$P/lib/$ARCH${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
  # One machine, no fabric: shared memory and self only (the network components' libraries are not carried).
  # The image has a PMIx of its own whose components do not load into Debian's: say nothing of it.
  export PMIX_MCA_pcompress_base_silence_warning=1 PMIX_MCA_mca_base_component_show_load_errors=0
  export OMPI_MCA_pml=ob1 OMPI_MCA_btl=self,vader OMPI_MCA_mtl=^ofi,psm,psm2 OMPI_MCA_osc=^ucx
  MPIRUN="$P/usr/bin/mpirun.openmpi"
}

# cmake arguments that point every non-LibTorch dependency into $P (no compiler wrappers: their
# paths are the packages' original ones).
dep_args() {
  local L="$P/usr/lib/$ARCH"
  echo -DCMAKE_PREFIX_PATH="$1;$P/usr" -DCMAKE_LIBRARY_PATH="$L" -DCMAKE_INCLUDE_PATH="$P/usr/include" \
    -DMPI_SKIP_COMPILER_WRAPPER=ON -DMPI_SKIP_GUESSING=ON -DMPI_C_HEADER_DIR="$L/openmpi/include" \
    -DMPI_C_LIB_NAMES=mpi -DMPI_mpi_LIBRARY="$L/openmpi/lib/libmpi.so" -DMPIEXEC_EXECUTABLE="$P/usr/bin/mpirun.openmpi" \
    -DHDF5_ROOT="$L/hdf5/serial" -DHDF5_C_COMPILER_EXECUTABLE= -DHDF5_CXX_COMPILER_EXECUTABLE= \
    -DHDF5_C_INCLUDE_DIR="$P/usr/include/hdf5/serial" -DHDF5_CXX_INCLUDE_DIR="$P/usr/include/hdf5/serial" \
    -DHTTPLIB_INCLUDE_DIR="$P/usr/include" -DHTTPLIB_LIBRARY="$L/libcpp-httplib.so" -DSENTENCEPIECE_INCLUDE_DIR="$P/usr/include" \
    -DSENTENCEPIECE_LIBRARY="$L/libsentencepiece.so" -DSENTENCEPIECE_TRAIN_LIBRARY="$L/libsentencepiece_train.so"
}

prepare() {
  mkdir -p "$G/debs"
  if [ ! -f "$G/debs/.complete" ]; then
    say "downloading ${#DEBS[@]} Debian packages into .gpu/debs"
    (cd "$G/debs" && apt-get download "${DEBS[@]}") || die "apt-get download failed (apt-get update first?)"
    touch "$G/debs/.complete"
  fi
  rm -f "$P/.complete"; unpack
  say "unpacked under .gpu/root ($(du -sh "$G/debs" | cut -f1) of .debs)"
  local bin="$ROOT/build/andyllm"
  [ -x "$bin" ] || die "build/andyllm is not built (scripts/setup.sh): it makes the suite's datasets"
  # The corpus: the demo text; the 32000-piece vocabulary the GPT-2-small-sized config uses.
  if [ ! -f "$G/data/manifest.json" ]; then
    [ -d "$ROOT/data/demo/raw" ] || "$ROOT/scripts/make_demo_corpus.sh" "$ROOT/data/demo/raw"
    "$bin" preprocess --input_dir "$ROOT/data/demo/raw" --output_dir "$G/data" --vocab_size 32000 || die "preprocess failed"
  fi
  # A small model trained here on the CPU (fp32: configs/tiny.toml on the demo dataset, as the
  # quickstart does), and its greedy completions by the CPU engine: the GPU engine must produce the
  # same token ids.
  if [ ! -f "$G/tiny/expected.jsonl" ]; then
    local demo="$ROOT/data/demo/processed"
    [ -f "$demo/manifest.json" ] || "$bin" preprocess --input_dir "$ROOT/data/demo/raw" --output_dir "$demo" --vocab_size 4096 ||
      die "preprocess of the demo corpus failed"
    rm -rf "$G/tiny" && mkdir -p "$G/tiny"
    (source "$ROOT/scripts/env.sh"; mpirun -np 2 "$bin" train --config "$ROOT/configs/tiny.toml" --train_file "$demo/train" \
      --val_file "$demo/validation" --set data.tokenizer_path="$demo/tokenizer.model" --output_dir "$G/tiny/run") \
      >"$G/tiny/train.log" 2>&1 || die "training the reference model failed: $G/tiny/train.log"
    mkdir -p "$G/tiny/model" && cp "$G/tiny/run/best_model/"* "$G/tiny/model/" && cp "$demo/tokenizer.model" "$G/tiny/"
    rm -rf "$G/tiny/run"
    printf '%s\n' '{"prompt": "The computer"}' '{"prompt": "Once upon a time"}' '{"prompt": "Q: What is the meaning of life?\nA:"}' \
      '{"prompt": "Debian is"}' >"$G/tiny/prompts.jsonl"
    "$bin" generate --model "$G/tiny/model" --tokenizer_path "$G/tiny/tokenizer.model" --prompts_file "$G/tiny/prompts.jsonl" \
      --temperature 0 --max_tokens 48 --ignore_eos --output "$G/tiny/expected.jsonl" || die "CPU generate failed"
  fi
  say "ready: carry .gpu/debs .gpu/data .gpu/tiny ($(du -shc "$G/debs" "$G/data" "$G/tiny" | tail -1 | cut -f1); .gpu/root is re-made there)"
}

selfcheck() {
  # Hide the system's copies of every carried package, then configure and run MPI from .gpu/root.
  [ "$(id -u)" = 0 ] || die "selfcheck needs root (a private mount namespace)"
  unpack
  exec unshare -m bash -c '
    set -e
    hide() { for p in "$@"; do if [ -d "$p" ]; then mount -t tmpfs none "$p"; elif [ -e "$p" ]; then mount --bind /dev/null "$p"; fi; done; }
    L=/usr/lib/'$ARCH'
    hide $L/openmpi $L/pmix2 /usr/share/openmpi /usr/include/hdf5 $L/hdf5 /usr/include/toml++ $L/cmake/tomlplusplus \
         $L/cmake/GTest /usr/include/gtest /usr/share/cmake/nlohmann_json /usr/include/nlohmann /usr/include/httplib.h \
         /usr/include/sentencepiece_processor.h /usr/include/sentencepiece_trainer.h /usr/bin/h5cc /usr/bin/h5c++ /usr/bin/mpicc
    for f in $L/libmpi.so* $L/libhdf5* $L/libsentencepiece* $L/libtomlplusplus* $L/libcpp-httplib* $L/libopen-pal* $L/libopen-rte* \
             $L/libpmix* /usr/bin/mpirun* /usr/bin/orted* /usr/bin/mpiexec*; do hide "$f"; done
    "'"$0"'" selfcheck-inner'
}

selfcheck_inner() {
  relocated_env
  local B="$ROOT/build-gpucheck"
  rm -rf "$B" && mkdir -p "$B"
  say "configure against .gpu/root with the system copies hidden (system LibTorch)"
  cmake -S "$ROOT" -B "$B" -G Ninja -DANDYLLM_WITH_CUDA=OFF $(dep_args /usr) >"$B/configure.log" 2>&1 || { tail -30 "$B/configure.log"; die "configure failed"; }
  grep "AndyLLM:" "$B/configure.log"
  # A C MPI program, compiled and run with the relocated Open MPI: 2 ranks under mpirun, 1 without.
  cat >"$B/hello.c" <<'EOF'
#include <mpi.h>
#include <stdio.h>
int main(int c, char** v) { int r, n, x = 1, s = 0; MPI_Init(&c, &v); MPI_Comm_rank(MPI_COMM_WORLD, &r);
  MPI_Comm_size(MPI_COMM_WORLD, &n); MPI_Allreduce(&x, &s, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
  printf("rank %d of %d: sum %d\n", r, n, s); MPI_Finalize(); return s == n ? 0 : 1; }
EOF
  cc "$B/hello.c" -I"$P/usr/lib/$ARCH/openmpi/include" -L"$P/usr/lib/$ARCH/openmpi/lib" -lmpi -o "$B/hello" || die "MPI compile failed"
  "$MPIRUN" -np 2 "$B/hello" || die "relocated mpirun failed"
  "$B/hello" || die "relocated singleton MPI failed"
  if [ "${SELFCHECK_BUILD:-0}" = 1 ]; then  # the whole executable too (minutes on few cores)
    cmake --build "$B" --target andyllm >"$B/build.log" 2>&1 || { grep -m5 -A12 "error" "$B/build.log"; die "build failed"; }
    local demo="$G/data"
    "$MPIRUN" -np 2 "$B/andyllm" train --config "$ROOT/configs/tiny.toml" --set model.vocab_size=32000 --train_file "$demo/train" \
      --val_file "$demo/validation" --set data.tokenizer_path="$demo/tokenizer.model" --output_dir "$B/run" \
      --set train.max_steps=4 --set train.eval_interval=4 --set train.intra_op_threads=1 || die "relocated training run failed"
  fi
  say "selfcheck passed"
}

run_suite() {
  local R="${OUT:-$G/results}"
  mkdir -p "$R"
  local RES="$R/gpu_results.txt"
  if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    die "no NVIDIA GPU here (nvidia-smi -L fails): this suite runs on a GPU machine; see docs/PERFORMANCE.md"
  fi
  python3 -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' ||
    die "python3's torch sees no CUDA device: the suite builds against that LibTorch"
  exec > >(tee "$R/gpu_suite.log") 2>&1
  local torch_prefix nccl_dir
  torch_prefix=$(python3 -c 'import torch; print(torch.utils.cmake_prefix_path)')
  # NCCL: the one PyTorch loads (the nvidia-nccl wheel), else the CUDA toolkit's or the system's.
  nccl_dir=$(python3 -c 'import nvidia.nccl as n; print(list(n.__path__)[0])' 2>/dev/null)
  if [ ! -f "$nccl_dir/include/nccl.h" ]; then
    nccl_dir=$(dirname "$(dirname "$(ls /usr/local/cuda/include/nccl.h /usr/include/nccl.h 2>/dev/null | head -1)")")
  fi
  LOGS=/tmp/gpu_suite_logs; rm -rf "$LOGS"; mkdir -p "$LOGS"
  # At most a few files come back from the machine: the results, the whole log, and the rest packed.
  trap "tar -C '$LOGS' -czf '$R/logs.tgz' . 2>/dev/null" EXIT
  {
    echo "# AndyLLM GPU suite, $(date -u +%FT%TZ), git ${GIT_REV:-$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')}, sources $(source_digest)"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | sed 's/^/# gpu: /'
    python3 -c 'import torch; print("# torch", torch.__version__, "cuda", torch.version.cuda, "cxx11abi", torch.compiled_with_cxx11_abi())'
    echo "# nccl: $nccl_dir; $(nproc) cores"
  } | tee "$RES"
  unpack
  relocated_env
  local B="$ROOT/build-gpu" NCCL_LIB
  NCCL_LIB=$(ls "$nccl_dir"/lib/libnccl.so* "$nccl_dir"/lib64/libnccl.so* "$nccl_dir"/lib/x86_64-linux-gnu/libnccl.so* 2>/dev/null | head -1)
  say "configure (LibTorch $torch_prefix)"
  local t0=$SECONDS
  cmake -S "$ROOT" -B "$B" -G Ninja -DCMAKE_BUILD_TYPE=Release $(dep_args "$torch_prefix") \
    -DTORCH_CUDA_ARCH_LIST=9.0 -DCMAKE_CUDA_ARCHITECTURES=90 -DNCCL_INCLUDE_DIR="$nccl_dir/include" -DNCCL_LIBRARY="$NCCL_LIB" \
    >"$LOGS/configure.log" 2>&1 || { tail -40 "$LOGS/configure.log"; die "configure failed"; }
  grep "AndyLLM:" "$LOGS/configure.log"
  say "build (andyllm + the gpu tests, $(nproc) jobs)"
  local gpu_tests
  gpu_tests=$(grep -h "LABELS gpu" -r "$ROOT/tests" --include=CMakeLists.txt | sed -E 's/.*andyllm_add_test\((\w+).*/\1/' | tr '\n' ' ')
  cmake --build "$B" -j "$(nproc)" --target andyllm $gpu_tests >"$LOGS/build.log" 2>&1 || { grep -m5 -A12 "error" "$LOGS/build.log"; die "build failed"; }
  echo "build: $((SECONDS - t0)) s (configure + andyllm + $gpu_tests)" | tee -a "$RES"
  local BIN="$B/andyllm"
  "$BIN" version | tee -a "$RES"

  if want tests; then say "gpu tests"
  (cd "$B" && ctest -L gpu --output-on-failure --timeout 300) 2>&1 | tail -15 | tee -a "$RES"; fi

  if want comm; then say "NCCL collectives, 1 rank"
  timeout 120 "$MPIRUN" -np 1 "$BIN" bench comm --backend nccl --op all --min_bytes 65536 --max_bytes 268435456 --factor 16 2>&1 | tee -a "$RES"
  echo "bench comm exit status: ${PIPESTATUS[0]}" | tee -a "$RES"; fi

  local D="$G/data" T="$G/tiny"
  local common=(--train_file "$D/train" --val_file "$D/validation" --set data.tokenizer_path="$D/tokenizer.model")
  if want train; then say "training: tiny, 30 steps, cuda fp32 and bf16 (fp32 and bf16 residual stream) against cpu fp32 (loss at steps 1, 10, 20, 30)"
  for dm in cpu:fp32 cuda:fp32 cuda:bf16 cuda:bf16r; do
    local mode=${dm#*:} res=true
    [ "$mode" = bf16r ] && { mode=bf16; res=false; }
    timeout 180 "$MPIRUN" -np 1 "$BIN" train --config "$ROOT/configs/tiny.toml" --set model.vocab_size=32000 "${common[@]}" \
      --output_dir "/tmp/gs_tiny_${dm/:/_}" --device "${dm%:*}" --set precision.mode="$mode" --set precision.fp32_residual=$res --set train.max_steps=30 \
      --set train.log_interval=1 --set train.eval_interval=1000 --set checkpoint.interval=1000 >"$LOGS/train_tiny_${dm/:/_}.log" 2>&1
    echo "train tiny $dm (rc $?): $(grep -oE 'step +(1|10|20|30)/30.*loss [0-9.]+' "$LOGS/train_tiny_${dm/:/_}.log" | grep -oE 'loss [0-9.]+' | tr '\n' ' ')" | tee -a "$RES"
    rm -rf "/tmp/gs_tiny_${dm/:/_}"
  done; fi

  if want generate; then say "engine on the GPU: greedy token ids against the CPU engine's (computed by prepare)"
  timeout 120 "$MPIRUN" -np 1 "$BIN" generate --model "$T/model" --tokenizer_path "$T/tokenizer.model" --device cuda \
    --prompts_file "$T/prompts.jsonl" --temperature 0 --max_tokens 48 --ignore_eos --output "$LOGS/generate_cuda.jsonl" >"$LOGS/generate.log" 2>&1
  python3 - "$T/expected.jsonl" "$LOGS/generate_cuda.jsonl" <<'EOF' 2>&1 | tee -a "$RES"
import json, sys
exp = [json.loads(l) for l in open(sys.argv[1])]
try: got = [json.loads(l) for l in open(sys.argv[2])]
except OSError: got = []
same = sum(1 for e, g in zip(exp, got) if e["token_ids"] == g["token_ids"])
first = [next((i for i, (a, b) in enumerate(zip(e["token_ids"], g["token_ids"])) if a != b), None) for e, g in zip(exp, got)]
print(f"generate cuda vs cpu (greedy, fp32): {same}/{len(exp)} completions with identical token ids; first differing position per prompt: {first}")
EOF
  fi

  if want hf; then say "Hugging Face export of the same model, loaded by transformers: greedy ids against AndyLLM's"
  rm -rf /tmp/gs_hf
  "$BIN" export --format hf --model_path "$T/model" --tokenizer_path "$T/tokenizer.model" --output_dir /tmp/gs_hf \
    >"$LOGS/export_hf.log" 2>&1 || { tail -5 "$LOGS/export_hf.log" | tee -a "$RES"; }
  timeout 180 python3 "$ROOT/tests/formats/transformers_check.py" /tmp/gs_hf "$T/expected.jsonl" 2>&1 |
    grep -vE "Warning|warn\(" | tee -a "$RES"
  echo "transformers check exit status: ${PIPESTATUS[0]}" | tee -a "$RES"; fi

  local M="$ROOT/configs/gpt2_124m_gpu.toml"
  # One bench train run: $1 mode, $2 micro-batch, $3 label; further arguments go to andyllm.
  bench_train() {
    local mode=$1 mb=$2 label=$3; shift 3
    timeout 300 "$MPIRUN" -np 1 "$BIN" bench train --config "$M" --set data.train_file="$D/train" --set data.tokenizer_path="$D/tokenizer.model" \
      --set precision.mode=$mode --set train.batch_size=$mb --steps 25 --warmup 5 "$@" 2>&1 | tee "$LOGS/bench_train_${label// /_}_$mb.log" |
      grep -E "^(# bench|step time|tokens/s|model TFLOP|MFU)" | sed "s/^/[$label, micro-batch $mb] /" | tee -a "$RES"
  }
  local batches=${GPU_SUITE_BATCHES:-16 64}
  if want bench_train; then say "bench train: GPT-2-small-sized model, bf16 and fp16"
  for mode in bf16 fp16; do for mb in $batches; do bench_train $mode $mb $mode; done; done; fi
  if want fp32res; then say "bench train bf16 with the fp32 residual stream (PyTorch autocast's; the config keeps it in bf16)"
  for mb in $batches; do bench_train bf16 "$mb" "bf16 fp32-residual" --set precision.fp32_residual=true; done; fi
  if want unfused; then say "bench train bf16 with ANDYLLM_FUSED_OPS=0 (the LibTorch composites instead of our CUDA kernels and LibTorch 2.x fused RMSNorm and AdamW)"
  for mb in $batches; do ANDYLLM_FUSED_OPS=0 bench_train bf16 "$mb" "bf16 unfused"; done; fi
  if want profile; then say "profile: 2 bf16 steps of the same model under LibTorch's profiler, GPU time by kernel"
  local mb1=${batches%% *}
  bench_train bf16 "$mb1" "bf16 profiled" --profile "$LOGS/trace_bf16.json" --profile_steps 2
  python3 "$ROOT/scripts/trace_summary.py" "$LOGS/trace_bf16.json" 2 2>&1 | tee -a "$RES"
  fi
  if want pytorch; then say "PyTorch eager on the same model and step (bf16 autocast, fused attention)"
  for mb in ${GPU_SUITE_PYTORCH_BATCHES:-16}; do for res in bf16 fp32; do
    timeout 200 python3 "$ROOT/scripts/bench_pytorch.py" --config "$M" --ranks 1 --threads "$(nproc)" --device cuda --bf16 \
      --residual $res --batch "$mb" --steps 25 --warmup 5 2>&1 | tail -1 | sed "s/^/[pytorch, micro-batch $mb] /" | tee -a "$RES"
  done; done; fi

  if want bench_generate; then say "bench generate: the same model (20 training steps to make its directory)"
  rm -rf /tmp/gs_124m  # a rerun on a warm machine: not a resume of the last one
  timeout 200 "$MPIRUN" -np 1 "$BIN" train --config "$M" "${common[@]}" --output_dir /tmp/gs_124m --set train.max_steps=20 \
    --set train.eval_interval=20 --set train.eval_batches=2 --set checkpoint.interval=1000 >"$LOGS/train_124m.log" 2>&1 ||
    tail -5 "$LOGS/train_124m.log"
  timeout 240 "$MPIRUN" -np 1 "$BIN" bench generate --model /tmp/gs_124m/best_model --device cuda --concurrency 1,8,32,128 --max_num_seqs 128 \
    --input_len 128 --output_len 128 2>&1 | tee "$LOGS/bench_generate.log" | grep -vE "^\s*$" | tee -a "$RES"; fi
  say "done: $RES"
}

case "${1:-run}" in
  prepare) prepare ;;
  selfcheck) selfcheck ;;
  selfcheck-inner) selfcheck_inner ;;
  run) run_suite ;;
  digest) source_digest ;;
  *) die "usage: scripts/gpu_suite.sh prepare|selfcheck|run|digest" ;;
esac
