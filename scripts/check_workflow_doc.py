#!/usr/bin/env python3
"""Keeps docs/WORKFLOW.md and docs/WORKFLOW.zh-CN.md from rotting (run by ctest as
test_workflow_demo_doc; scripts/workflow_demo.sh runs the commands themselves on the demo data).

For every command line of a ```sh block that runs andyllm (`andyllm ...`, `build/andyllm ...`,
`mpirun ... andyllm ...`, `srun ... andyllm ...`, `scripts/mpirun.sh N SUBCOMMAND ...`):
  - the subcommand exists (`andyllm SUBCOMMAND --help` succeeds; `bench` takes its own word),
  - every --flag is one that `andyllm SUBCOMMAND --help` lists (`-` and `_` are the same),
  - every `--set section.key=value` names a key of `andyllm train --help_config`.
Everywhere: configs/ and scripts/ files named in a ```sh block exist, and every `section.key`
written in backticks is a config key. Then the Chinese page must have the same headings count,
the same ```sh command lines (comments aside) in the same order, and the same code in its other
code blocks (comments aside), and README.md must link both pages.

  scripts/check_workflow_doc.py [EN.md ZH.md]   # ANDYLLM_BIN: the executable (default build/andyllm)
Prints one line per problem, and exits 1 if there is any.
"""
import io
import os
import re
import shlex
import subprocess
import sys
import tokenize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EN = os.path.join(ROOT, "docs", "WORKFLOW.md")
ZH = os.path.join(ROOT, "docs", "WORKFLOW.zh-CN.md")
BIN = os.environ.get("ANDYLLM_BIN", os.path.join(ROOT, "build", "andyllm"))
SECTIONS = ("model", "data", "train", "parallel", "precision", "checkpoint", "serve")
SEPARATORS = {"|", "||", "&&", ";", "&"}
# `train.py`, `model.pt`, ...: file names, not config keys.
FILE_EXTENSIONS = {"py", "pt", "h5", "toml", "json", "jsonl", "md", "sh", "txt", "model", "vocab",
                   "safetensors", "gguf", "mjs"}

problems = []


def problem(where, text):
    problems.append(f"{where}: {text}")


def code_blocks(path):
    """[(language, first line number, [lines])] of the fenced code blocks of a Markdown file."""
    blocks, current = [], None
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            stripped = line.strip()
            if current is None and stripped.startswith("```"):
                current = (stripped[3:].strip(), n + 1, [])
            elif current is not None and stripped == "```":
                blocks.append(current)
                current = None
            elif current is not None:
                current[2].append(line.rstrip("\n"))
    return blocks


def sh_commands(path):
    """[(line number, [tokens])] of every command in the ```sh blocks, comments dropped,
    continuation lines joined, pipelines and lists split into their commands."""
    out = []
    for lang, first, lines in code_blocks(path):
        if lang not in ("sh", "bash", "console"):
            continue
        joined, start = "", None
        for i, line in enumerate(lines):
            if start is None:
                start = first + i
            if line.endswith("\\"):
                joined += line[:-1] + " "
                continue
            joined += line
            try:
                tokens = shlex.split(joined, comments=True)
            except ValueError as e:
                problem(f"{path}:{start}", f"cannot split the command line: {e}")
                tokens = []
            command = []
            for t in tokens + [";"]:
                if t in SEPARATORS:
                    if command:
                        out.append((start, command))
                    command = []
                else:
                    command.append(t)
            joined, start = "", None
    return out


def is_andyllm(token):
    return token == "andyllm" or token.endswith("/andyllm")


def andyllm_part(tokens):
    """The tokens from the subcommand on, for a command that runs andyllm; else None."""
    while tokens and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", tokens[0]):
        tokens = tokens[1:]  # VAR=value prefixes
    if not tokens:
        return None
    if tokens[0].endswith("scripts/mpirun.sh"):
        return tokens[2:]
    if is_andyllm(tokens[0]):
        return tokens[1:]
    if os.path.basename(tokens[0]) in ("mpirun", "mpiexec", "srun", "timeout", "time", "nohup"):
        for i, t in enumerate(tokens):
            if is_andyllm(t):
                return tokens[i + 1:]
    return None


_help_cache = {}


def help_text(*words):
    if words not in _help_cache:
        r = subprocess.run([BIN, *words, "--help"], capture_output=True, text=True)
        _help_cache[words] = (r.returncode, r.stdout + r.stderr)
    return _help_cache[words]


def flags_of(text):
    return {m.group(1).replace("-", "_") for m in re.finditer(r"^\s+--([A-Za-z0-9_-]+)", text, re.M)} | {"help"}


def config_keys():
    r = subprocess.run([BIN, "train", "--help_config"], capture_output=True, text=True)
    keys, section = set(), None
    for line in (r.stdout + r.stderr).splitlines():
        m = re.match(r"^\[([a-z_]+)\]\s*$", line)
        if m:
            section = m.group(1)
            continue
        m = re.match(r"^  ([a-z_0-9]+) \(", line)
        if m and section:
            keys.add(f"{section}.{m.group(1)}")
    if not keys:
        problem(BIN, "train --help_config listed no keys")
    return keys


def check_andyllm_command(where, args, keys):
    if not args or args[0].startswith("-"):
        return  # `andyllm --help`, `andyllm version`-like lines without a subcommand
    sub = [args[0]]
    rc, text = help_text(*sub)
    if rc != 0:
        problem(where, f"unknown subcommand 'andyllm {args[0]}'")
        return
    rest = args[1:]
    if args[0] == "bench":
        if not rest or not re.search(rf"andyllm bench {re.escape(rest[0])}\b", text):
            problem(where, f"unknown 'andyllm bench {rest[0] if rest else ''}'")
            return
        rest = rest[1:]
    known = flags_of(text)
    for i, t in enumerate(rest):
        if not t.startswith("--"):
            continue
        name = t[2:].split("=", 1)[0].replace("-", "_")
        if name not in known:
            problem(where, f"'andyllm {' '.join(sub)}' has no flag --{t[2:].split('=', 1)[0]}")
        if name == "set":
            value = t.split("=", 1)[1] if "=" in t else (rest[i + 1] if i + 1 < len(rest) else "")
            key = value.split("=", 1)[0]
            if key not in keys:
                problem(where, f"--set {value}: no config key '{key}' (andyllm train --help_config)")


def check_page(path, keys):
    rel = os.path.relpath(path, ROOT)
    n = 0
    for line, tokens in sh_commands(path):
        where = f"{rel}:{line}"
        for t in tokens:
            for m in re.finditer(r"(?:^|[=\s])((?:configs|scripts)/[A-Za-z0-9_.\-/]+)", t):
                if not os.path.exists(os.path.join(ROOT, m.group(1))):
                    problem(where, f"{m.group(1)} does not exist")
        args = andyllm_part(tokens)
        if args is not None:
            n += 1
            check_andyllm_command(where, args, keys)
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            for m in re.finditer(r"`((?:%s)\.([a-z_0-9]+))`" % "|".join(SECTIONS), line):
                if m.group(2) not in FILE_EXTENSIONS and m.group(1) not in keys:
                    problem(f"{rel}:{number}", f"`{m.group(1)}` is not a config key")
    return n


def without_comments(lang, lines):
    """The code of a block with its comments dropped, for comparing translations."""
    if lang in ("sh", "bash", "console"):
        out = []
        for line in lines:
            try:
                out.append(" ".join(shlex.split(line, comments=True)))
            except ValueError:
                out.append(line.strip())
        return [l for l in out if l]
    if lang == "python":
        try:
            toks = [t for t in tokenize.generate_tokens(io.StringIO("\n".join(lines) + "\n").readline)
                    if t.type not in (tokenize.COMMENT, tokenize.NL)]
            return [tokenize.untokenize(toks)]
        except (tokenize.TokenError, IndentationError, SyntaxError):
            pass
    if lang == "toml":
        return [l.split("#", 1)[0].strip() for l in lines if l.split("#", 1)[0].strip()]
    return None  # text blocks (output, diagrams) may be translated


def headings(path):
    with open(path, encoding="utf-8") as f:
        inside, out = False, []
        for line in f:
            if line.strip().startswith("```"):
                inside = not inside
            elif not inside and line.startswith("#"):
                out.append(line.split(" ", 1)[0])
    return out


def check_translation():
    en_blocks, zh_blocks = code_blocks(EN), code_blocks(ZH)
    if headings(EN) != headings(ZH):
        problem(ZH, f"headings {headings(ZH)} differ from the English page's {headings(EN)}")
    if [b[0] for b in en_blocks] != [b[0] for b in zh_blocks]:
        problem(ZH, "its code blocks (count or languages) differ from the English page's")
        return
    for (lang, en_line, en), (_, zh_line, zh) in zip(en_blocks, zh_blocks):
        a, b = without_comments(lang, en), without_comments(lang, zh)
        if a is not None and a != b:
            diff = next((f"'{x}' vs '{y}'" for x, y in zip(a, b) if x != y), f"{len(a)} vs {len(b)} lines")
            problem(f"{os.path.relpath(ZH, ROOT)}:{zh_line}",
                    f"the ```{lang} block differs from {os.path.relpath(EN, ROOT)}:{en_line} (comments aside): {diff}")


def main():
    global EN, ZH
    if len(sys.argv) == 3:
        EN, ZH = (os.path.abspath(p) for p in sys.argv[1:])
    if not os.access(BIN, os.X_OK):
        print(f"check_workflow_doc: {BIN} is not an executable (build it, or set ANDYLLM_BIN)", file=sys.stderr)
        return 1
    keys = config_keys()
    counts = {}
    for page in (EN, ZH):
        if not os.path.exists(page):
            problem(page, "missing")
            continue
        counts[page] = check_page(page, keys)
    if os.path.exists(EN) and os.path.exists(ZH):
        check_translation()
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    for page in ("docs/WORKFLOW.md", "docs/WORKFLOW.zh-CN.md"):
        if page not in readme:
            problem("README.md", f"no link to {page}")
    for p in problems:
        print(p)
    n = counts.get(EN, 0)
    print(f"check_workflow_doc: {n} andyllm command lines in {os.path.relpath(EN, ROOT)} checked against "
          f"'andyllm SUBCOMMAND --help' ({len(keys)} config keys); {len(problems)} problem(s)")
    return 1 if problems or n == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
