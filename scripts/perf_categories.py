#!/usr/bin/python3
"""Where a training step's CPU time goes, from `perf script` output with call stacks.

    perf script -i perf.data -F comm,pid,tid,time,ip,sym,dso | scripts/perf_categories.py --from T0 --to T1

Keeps the samples of the `andyllm` processes whose time lies in [T0, T1] (the "timed window"
line of `andyllm bench train`, CLOCK_MONOTONIC seconds: record with `perf record -k
CLOCK_MONOTONIC`) and puts each in one category by its stack (scripts/profile_train.sh runs it
all). Rules, in order:
  1. communication: any frame in MPI / Open MPI / UCX / NCCL or AndyLLM's communicators;
  2. the innermost frame naming a part of the model or the step: optimizer (clipping, AdamW),
     cross-entropy, attention (its matmuls and softmax included, forward and backward),
     norms (RMSNorm), rope + swiglu, embedding, data (the HDF5 reader);
  3. otherwise by what runs: matmul (BLAS / oneDNN GEMMs and the linear layers' autograd
     nodes), code compiled at run time (oneDNN's JIT kernels: the bf16 matmuls; perf cannot
     unwind through them, so their callers, attention's included, are unknown), allocator (malloc / free, page faults, zeroing of new pages), LibTorch's other
     kernels and dispatch, other kernel work, other.
Prints one row per category: samples, share of all samples in the window.
"""
import argparse
import re
import sys
from collections import Counter

COMM = re.compile(r"\b(P?MPI_|ompi_|opal_|mca_|ucp_|uct_|ucs_|nccl|andy::MpiCommunicator|andy::MpiComm|"
                  r"andy::CollectiveThread|andy::NcclCommunicator|andy::Work::wait)")
COMM_DSO = re.compile(r"libmpi|libopen-pal|libopen-rte|libucp|libuct|libucs|mca_|libnccl")
SCOPES = [
    ("optimizer", re.compile(r"andy::Trainer::clip_and_apply|adamw|AdamW|andy::.*clip_grad|unscale_and_find_nonfinite|zero_grad")),
    ("cross-entropy", re.compile(r"CrossEntropy|cross_entropy")),
    ("attention", re.compile(r"^andy::(explicit_)?attention$|andy::causal_mask|BmmBackward|SoftmaxBackward|"
                             r"_softmax|softmax_lastdim|MaskedFillBackward|grouped_attention")),
    ("norms", re.compile(r"RmsNorm|rms_norm|rms_forward|rms_backward")),
    ("rope + swiglu", re.compile(r"Rope|rope_|Swiglu|swiglu")),
    ("embedding", re.compile(r"[Ee]mbedding")),
    ("data", re.compile(r"andy::.*(Dataset|DataLoader|Batcher|TokenReader)|^H5")),
]
MATMUL = re.compile(r"gemm|GEMM|dnnl|mkldnn|brg|jit_avx|MmBackward|AddmmBackward|structured_mm|structured_addmm|"
                    r"at::native::linear|_ops::mm::|_ops::addmm::|_ops::matmul")
ALLOC = re.compile(r"^(malloc|free|cfree|_int_malloc|_int_free|malloc_consolidate|unlink_chunk|realloc|calloc|"
                   r"sysmalloc|__libc_malloc|__libc_free|tcache_|_int_realloc|posix_memalign|aligned_alloc|"
                   r"c10::alloc_cpu|c10::free_cpu)|exc_page_fault|do_anonymous_page|clear_page|handle_mm_fault|"
                   r"__memset|do_user_addr_fault|mmap|munmap|zap_|__handle_mm_fault|page_fault|alloc_pages|"
                   r"folio|do_fault")
ORDER = ["matmul", "matmul, oneDNN JIT code (bf16)", "attention", "norms", "rope + swiglu", "cross-entropy", "embedding", "optimizer",
         "communication", "data", "allocator", "LibTorch other (kernels, dispatch, autograd)", "kernel other",
         "other"]


def classify(frames):
    """frames: [(sym, dso)], leaf first."""
    for sym, dso in frames:
        if COMM.search(sym) or COMM_DSO.search(dso):
            return "communication"
    for sym, _ in frames:
        for name, rx in SCOPES:
            if rx.search(sym):
                return name
    for sym, _ in frames:
        if MATMUL.search(sym) or "openblas" in frames[0][1] or "libdnnl" in frames[0][1]:
            return "matmul"
    leaf_sym, leaf_dso = frames[0]
    # Code compiled at run time (no symbols, and no unwind information, so the stack ends
    # there): oneDNN's JIT kernels, which run LibTorch 1.13's bf16 matmuls on CPU.
    if re.search(r"perf-\d+\.map|//anon|\[anon", leaf_dso):
        return "matmul, oneDNN JIT code (bf16)"
    if ALLOC.search(leaf_sym):
        return "allocator"
    # Kernel frames at the leaf: find the first user frame to tell allocator work (page faults)
    # from other kernel work.
    if "kernel" in leaf_dso:
        for sym, dso in frames:
            if ALLOC.search(sym):
                return "allocator"
        return "kernel other"
    if any(("libtorch" in d or "libc10" in d or "libsleef" in d or "libgomp" in d) for _, d in frames[:3]):
        return "LibTorch other (kernels, dispatch, autograd)"
    return "other"


def samples(lines):
    head, frames = None, []
    for line in lines:
        line = line.rstrip("\n")
        if not line.strip():
            if head is not None:
                yield head, frames
            head, frames = None, []
            continue
        if not line.startswith((" ", "\t")):
            head, frames = line, []
            continue
        parts = line.strip().split(" ", 1)
        if len(parts) < 2:
            continue
        rest = parts[1]
        m = re.match(r"(.*) \(([^()]*)\)$", rest)
        sym, dso = (m.group(1), m.group(2)) if m else (rest, "")
        frames.append((sym, dso))
    if head is not None:
        yield head, frames


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--from", dest="t0", type=float, required=True)
    ap.add_argument("--to", dest="t1", type=float, required=True)
    ap.add_argument("--comm", default="andyllm", help="keep threads whose name starts with this (default andyllm: andyllm-mpi is the MPI communication thread)")
    ap.add_argument("--title", default="")
    ap.add_argument("--detail", type=int, default=0, help="also list the N commonest leaf functions of each category")
    a = ap.parse_args()
    counts = Counter()
    leaves = {}
    total = 0
    for head, frames in samples(sys.stdin):
        m = re.match(r"(\S+)\s+\d+/\d+\s+([0-9.]+):", head)
        if not m or not m.group(1).startswith(a.comm) or not frames:
            continue
        t = float(m.group(2))
        if t < a.t0 or t > a.t1:
            continue
        c = classify(frames)
        counts[c] += 1
        leaves.setdefault(c, Counter())[frames[0][0]] += 1
        total += 1
    if total == 0:
        sys.exit("perf_categories: no samples of '%s' between %.3f and %.3f (recorded with -k CLOCK_MONOTONIC?)"
                 % (a.comm, a.t0, a.t1))
    print("# %s%d samples in the timed window" % (a.title + ": " if a.title else "", total))
    print("%-46s %8s %7s" % ("category", "samples", "share"))
    for name in ORDER:
        if counts[name]:
            print("%-46s %8d %6.1f%%" % (name, counts[name], 100.0 * counts[name] / total))
            for sym, n in leaves[name].most_common(a.detail):
                print("    %-60s %5.1f%%" % (sym[:60], 100.0 * n / total))


if __name__ == "__main__":
    main()
