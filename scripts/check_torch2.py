#!/usr/bin/python3
"""Compiles every AndyLLM source (syntax and types, no linking) against LibTorch 2.x headers,
with and without CUDA, so the code keeps building on PyTorch 2.x GPU machines although this
machine has Debian 12's LibTorch 1.13 (CPU).

The headers come from Debian trixie's libtorch-dev and libtorch-cuda-dev (2.6, contrib): the two
.debs are downloaded with apt into a private cache (nothing is installed, the system's apt
state is untouched) and unpacked under build/torch2/. The compile commands are build/'s own
(compile_commands.json) with the LibTorch include directories swapped; the CUDA variant adds
-DANDYLLM_TORCH_CUDA and the CUDA toolkit's headers (/usr/local/cuda).

  scripts/check_torch2.py            # both variants; exit 1 if a source fails to compile
  scripts/check_torch2.py cpu        # one variant
  CHECK_TORCH2_ONLY=REGEX scripts/check_torch2.py cuda   # only the sources whose path matches
Exit 0 with a warning when the .debs cannot be downloaded (no network): nothing was checked.
"""
import concurrent.futures
import json
import os
import re
import shlex
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD = os.path.join(ROOT, "build")
WORK = os.path.join(BUILD, "torch2")
PACKAGES = {"cpu": "libtorch-dev", "cuda": "libtorch-cuda-dev"}


def apt_opts():
    return ["-o", f"Dir::State={WORK}/apt/state", "-o", f"Dir::Cache={WORK}/apt/cache",
            "-o", f"Dir::Etc::SourceList={WORK}/apt/sources.list", "-o", "Dir::Etc::SourceParts=/dev/null",
            "-o", f"Dir::State::status={WORK}/apt/state/status"]


def fetch_headers():
    """Unpacks both packages under WORK/<variant>; returns False when they cannot be fetched."""
    if all(os.path.isdir(f"{WORK}/{v}/usr/include/torch") for v in PACKAGES):
        return True
    for d in ["apt/state/lists/partial", "apt/cache/archives/partial", "debs"]:
        os.makedirs(f"{WORK}/{d}", exist_ok=True)
    with open(f"{WORK}/apt/sources.list", "w") as f:
        f.write("deb http://deb.debian.org/debian trixie main contrib\n")
    open(f"{WORK}/apt/state/status", "a").close()
    r = subprocess.run(["apt-get", *apt_opts(), "update"], capture_output=True, text=True)
    if r.returncode != 0:
        print(f"check_torch2: apt-get update (trixie) failed:\n{r.stderr[-2000:]}", file=sys.stderr)
        return False
    r = subprocess.run(["apt-get", *apt_opts(), "download", *PACKAGES.values()], cwd=f"{WORK}/debs",
                       capture_output=True, text=True)
    if r.returncode != 0:
        print(f"check_torch2: apt-get download failed:\n{r.stderr[-2000:]}", file=sys.stderr)
        return False
    for variant, pkg in PACKAGES.items():
        deb = [f for f in os.listdir(f"{WORK}/debs") if f.startswith(pkg + "_")][0]
        subprocess.run(["dpkg-deb", "-x", f"{WORK}/debs/{deb}", f"{WORK}/{variant}"], check=True)
    return True


def commands(variant):
    inc = f"{WORK}/{variant}/usr/include"
    with open(os.path.join(BUILD, "compile_commands.json")) as f:
        entries = json.load(f)
    for e in entries:
        src = e["file"]
        if "cmake_pch" in src or src.endswith(".cu"):
            continue  # the precompiled header; CUDA kernels include no LibTorch (nvcc builds them here)
        if os.environ.get("CHECK_TORCH2_ONLY") and not re.search(os.environ["CHECK_TORCH2_ONLY"], src):
            continue
        args = shlex.split(e["command"])
        out, skip = [], False
        for i, a in enumerate(args):
            if skip:
                skip = False
                continue
            if a in ("-include", "-o") or (a == "-isystem" and args[i + 1].startswith("/usr/include/torch")):
                skip = True  # the 1.13 precompiled header / object file / include directory
                continue
            if a in ("-Winvalid-pch", "-c") or a == src:
                continue
            out.append(a)
        pre = [out[0], "-isystem", inc, "-isystem", inc + "/torch/csrc/api/include"]
        if variant == "cuda":
            pre += ["-DANDYLLM_TORCH_CUDA=1", "-isystem", "/usr/local/cuda/include"]
        yield src, pre + out[1:] + ["-fsyntax-only", src], e["directory"]


def main():
    variants = sys.argv[1:] or list(PACKAGES)
    if not os.path.exists(os.path.join(BUILD, "compile_commands.json")):
        sys.exit("check_torch2: build/compile_commands.json missing: run scripts/setup.sh first")
    if not fetch_headers():
        print("check_torch2: WARNING: LibTorch 2.x headers unavailable (no network?): not checked")
        return 0
    failed = 0
    for variant in variants:
        if variant == "cuda" and not os.path.isdir("/usr/local/cuda/include"):
            print("check_torch2: no CUDA toolkit at /usr/local/cuda: cuda variant skipped")
            continue
        jobs = list(commands(variant))

        def run(job):
            src, cmd, cwd = job
            r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
            return src, r.returncode, r.stderr

        bad = 0
        with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 2) as ex:
            for src, rc, err in ex.map(run, jobs):
                if rc:
                    bad += 1
                    print(f"FAIL {os.path.relpath(src, ROOT)}")
                    print("\n".join([l for l in err.splitlines() if "error" in l][:10]))
        print(f"check_torch2: {len(jobs)} sources compiled against LibTorch 2.6 ({variant}"
              f"{' + CUDA headers' if variant == 'cuda' else ''}): {bad} failed")
        failed += bad
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
