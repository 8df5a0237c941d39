#!/usr/bin/python3
"""The include graph of AndyLLM by folder (layer), and whether the layers stay one-way.

Reads every #include "..." of the project's own headers in core/, parallel/, data/, serve/ and
launch/ (tests left out), aggregates them by folder and prints one line per edge with its count,
the files behind it with --files, and every include that goes against the layer order (exit 1
when there is one). The order, lowest first (docs/ARCHITECTURE.md):

  core/base -> core/config -> parallel -> core/model -> data -> serve -> launch

A folder may include its own headers and those of any folder before it; data/ is a sibling of
core/model (neither includes the other).

  scripts/include_graph.py            # edges and violations
  scripts/include_graph.py --files    # with the including files
  scripts/include_graph.py --dot      # Graphviz: scripts/include_graph.py --dot | dot -Tpng > layers.png
"""
import collections
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYERS = ["core/base", "core/config", "parallel", "core/model", "data", "serve", "launch"]
RANK = {name: i for i, name in enumerate(LAYERS)}
SIBLINGS = {("data", "core/model")}  # data/ sits above parallel/ but never uses the model
INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.M)


def folder_of(path):
    for name in sorted(LAYERS, key=len, reverse=True):
        if path == name or path.startswith(name + "/"):
            return name
    return None


def allowed(src, dst):
    if src == dst:
        return True
    if (src, dst) in SIBLINGS:
        return False
    return RANK[dst] < RANK[src]


def main():
    files_flag = "--files" in sys.argv
    dot = "--dot" in sys.argv
    edges = collections.defaultdict(list)
    for top in ("core", "parallel", "data", "serve", "launch"):
        for dirpath, _, names in os.walk(os.path.join(ROOT, top)):
            for n in sorted(names):
                if not n.endswith((".h", ".cpp", ".cu")):
                    continue
                path = os.path.relpath(os.path.join(dirpath, n), ROOT)
                src = folder_of(path)
                with open(os.path.join(ROOT, path), encoding="utf-8", errors="replace") as f:
                    for inc in INCLUDE.findall(f.read()):
                        dst = folder_of(inc)
                        if src and dst:
                            edges[(src, dst)].append(f"{path} -> {inc}")
    if dot:
        print("digraph andyllm {\n  rankdir=BT;")
        for (s, d), refs in sorted(edges.items()):
            if s != d:
                print(f'  "{s}" -> "{d}" [label="{len(refs)}"{", color=red" if not allowed(s, d) else ""}];')
        print("}")
        return 0
    bad = []
    for (s, d), refs in sorted(edges.items(), key=lambda e: (RANK[e[0][0]], RANK[e[0][1]])):
        ok = allowed(s, d)
        print(f"{s:12} -> {d:12} {len(refs):4} include(s){'' if ok else '   AGAINST THE LAYER ORDER'}")
        if files_flag or not ok:
            for r in refs:
                print(f"    {r}")
        if not ok:
            bad.extend(refs)
    print(f"# {len(bad)} include(s) against the layer order {' -> '.join(LAYERS)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
