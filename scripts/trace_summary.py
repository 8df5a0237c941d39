#!/usr/bin/env python3
"""Where the GPU time of a profiled training step goes, from the Chrome trace that
`andyllm bench train --profile FILE --profile_steps N` writes (LibTorch's Kineto profiler):
GPU busy time per step against the span of the step's kernels, the time by category (our own
kernels, matrix products, attention, optimizer, norms, softmax / cross-entropy, reductions, copies,
elementwise) and the top kernels with their launches per step.

  python3 scripts/trace_summary.py TRACE.json N_STEPS
"""
import collections
import json
import re
import sys

CATEGORIES = [
    ("ours (core/base/cuda_kernels.cu)", r"andy::cuda"),
    ("attention (flash / efficient)", r"flash|fmha|attention|attn|sdpa|cudnn"),
    ("gemm (cuBLAS / CUTLASS)", r"gemm|cutlass|nvjet|xmma|cublas|sm90_|sm100_"),
    ("optimizer (AdamW)", r"adam"),
    ("norm", r"norm"),
    ("softmax / cross-entropy", r"softmax|nll|cross_entropy"),
    ("reduction", r"reduce"),
    ("copy / cast / fill / index", r"copy|memcpy|memset|fill|cat|index|gather|scatter"),
    ("elementwise", r"elementwise|vectorized|unrolled|pointwise"),
]


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    events = json.load(open(sys.argv[1]))["traceEvents"]
    steps = max(1, int(sys.argv[2]))
    gpu = [e for e in events if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    if not gpu:
        sys.exit(f"trace_summary: no GPU kernels in {sys.argv[1]} (a CPU run, or the profiler saw no CUDA activity)")
    by_cat, by_name, count = collections.Counter(), collections.Counter(), collections.Counter()
    for e in gpu:
        name = e["name"][:100]
        by_name[name] += e["dur"]
        count[name] += 1
        by_cat[next((c for c, r in CATEGORIES if re.search(r, e["name"], re.I)), "other")] += e["dur"]
    busy = sum(e["dur"] for e in gpu)
    t0, t1 = min(e["ts"] for e in gpu), max(e["ts"] + e["dur"] for e in gpu)
    print(f"profile: {steps} step(s), {len(gpu) // steps} GPU kernels and copies per step, GPU busy "
          f"{busy / 1e3 / steps:.1f} ms per step of {(t1 - t0) / 1e3 / steps:.1f} ms from the first kernel to the last "
          f"({100 * busy / (t1 - t0):.0f} %)")
    for c, d in by_cat.most_common():
        print(f"  {c:32s} {d / 1e3 / steps:8.2f} ms/step  {100 * d / busy:5.1f} %")
    print("  top kernels: ms/step, launches/step, name")
    for name, d in by_name.most_common(25):
        print(f"    {d / 1e3 / steps:7.2f}  {count[name] // steps:5d}  {name}")


if __name__ == "__main__":
    main()
