#!/usr/bin/python3
"""Serving benchmark against a running `andyllm serve` (or any OpenAI-compatible server), in the
shape of vLLM's benchmark_serving: per concurrency, N streamed completions of exactly
--input_len prompt tokens and --output_len generated tokens (ignore_eos), then TTFT, TPOT
(time per output token after the first), ITL (gap between streamed chunks) and end-to-end
latency (mean, P50, P90, P99, in ms), request and output-token throughput.
Each request has its own prompt (a seeded draw of the tokens of some English text, so that no
two share a prefix and the prefix cache does not flatter the numbers; --same_prompt to allow it).
Standard library only (http.client + threads).

  scripts/bench_serve.py --url http://127.0.0.1:8000 --concurrency 1,8,32 --num_prompts 64 \\
      --input_len 32 --output_len 32
"""
import argparse
import http.client
import json
import random
import statistics
import threading
import time
import urllib.parse


def percentile(xs, p):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def prompt_ids(url, model, n):
    """n token ids of ordinary text (tokenized by the server itself)."""
    text = "the quick brown fox jumps over the lazy dog in the morning light by the river " * (n // 4 + 8)
    u = urllib.parse.urlparse(url)
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    c.request("POST", "/tokenize", json.dumps({"model": model, "prompt": text}), {"Content-Type": "application/json"})
    ids = json.loads(c.getresponse().read())["tokens"]
    if len(ids) < n:
        raise SystemExit(f"bench_serve: could not make a prompt of {n} tokens")
    return ids[:n]


def one_request(url, body, out):
    """Streams one completion; appends (ttft, itls, e2e, output_tokens) or an error to out."""
    u = urllib.parse.urlparse(url)
    t0 = time.perf_counter()
    try:
        c = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
        c.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        r = c.getresponse()
        if r.status != 200:
            out.append(("error", f"HTTP {r.status}: {r.read()[:200]!r}"))
            return
        ttft, last, itls, tokens = None, None, [], 0
        buf = b""
        while True:
            chunk = r.read1(65536) if hasattr(r, "read1") else r.read(1)
            if not chunk:
                break
            buf += chunk
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                if not event.startswith(b"data: "):
                    continue
                data = event[6:]
                if data == b"[DONE]":
                    continue
                j = json.loads(data)
                now = time.perf_counter()
                if j.get("usage"):
                    tokens = j["usage"]["completion_tokens"]
                if j.get("choices") and j["choices"][0].get("text"):
                    if ttft is None:
                        ttft = now - t0
                    else:
                        itls.append(now - last)
                    last = now
        out.append((ttft, itls, time.perf_counter() - t0, tokens))
    except Exception as e:  # noqa: BLE001 - reported, not raised
        out.append(("error", repr(e)))


def request_prompt(args, ids, i):
    """Request i's prompt: its own draw of the text's tokens (no shared prefix, so the server's
    prefix cache finds nothing, as with `bench generate`'s random prompts), or the text itself
    with --same_prompt."""
    if args.same_prompt:
        return ids
    rng = random.Random(1000003 * args.seed + i)
    return [rng.choice(ids) for _ in ids]


def run_level(args, ids, concurrency):
    results, lock, next_i = [], threading.Lock(), [0]

    def worker():
        while True:
            with lock:
                if next_i[0] >= args.num_prompts:
                    return
                i = next_i[0]
                next_i[0] += 1
            body = {"model": args.model, "prompt": request_prompt(args, ids, concurrency * 100000 + i),
                    "max_tokens": args.output_len, "ignore_eos": True, "temperature": 0, "stream": True,
                    "stream_options": {"include_usage": True}}
            one_request(args.url, body, results)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ok = [r for r in results if r[0] != "error"]
    errors = [r[1] for r in results if r[0] == "error"]
    ttft = [r[0] * 1e3 for r in ok if r[0] is not None]
    e2e = [r[2] * 1e3 for r in ok]
    itl = [x * 1e3 for r in ok for x in r[1]]
    tpot = [(r[2] - r[0]) * 1e3 / (r[3] - 1) for r in ok if r[0] is not None and r[3] > 1]
    out_tokens = sum(r[3] for r in ok)
    row = {"concurrency": concurrency, "requests": len(ok), "errors": len(errors), "seconds": wall,
           "req_per_s": len(ok) / wall, "output_tok_per_s": out_tokens / wall}
    for name, xs in (("ttft", ttft), ("tpot", tpot), ("itl", itl), ("e2e", e2e)):
        row[name] = {"mean": statistics.fmean(xs) if xs else float("nan"), "p50": percentile(xs, 50),
                     "p90": percentile(xs, 90), "p99": percentile(xs, 99)}
    if errors:
        print(f"  {len(errors)} error(s), first: {errors[0]}")
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", default=None, help="model id (default: the server's first)")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--num_prompts", type=int, default=64)
    ap.add_argument("--input_len", type=int, default=32)
    ap.add_argument("--output_len", type=int, default=32)
    ap.add_argument("--same_prompt", action="store_true",
                    help="every request sends the same prompt (prefix-cache hits); default: a distinct prompt each")
    ap.add_argument("--seed", type=int, default=0, help="seed of the prompts' token draws")
    ap.add_argument("--json", action="store_true", help="one JSON line per concurrency instead of the table")
    args = ap.parse_args()
    if args.model is None:
        u = urllib.parse.urlparse(args.url)
        c = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
        c.request("GET", "/v1/models")
        args.model = json.loads(c.getresponse().read())["data"][0]["id"]
    ids = prompt_ids(args.url, args.model, args.input_len)
    one_request(args.url, {"model": args.model, "prompt": ids, "max_tokens": 4, "stream": True}, [])  # warm-up
    if not args.json:
        print(f"# bench serve: {args.url} model {args.model}, {args.num_prompts} prompts of {args.input_len} "
              f"tokens, {args.output_len} output tokens each (ms: mean / p50 / p90 / p99)")
        print(f"{'conc':>4} {'req/s':>7} {'out tok/s':>9} {'TTFT':>27} {'TPOT':>23} {'ITL':>23} {'E2E':>27} err")
    for conc in [int(x) for x in args.concurrency.split(",")]:
        r = run_level(args, ids, conc)
        if args.json:
            print(json.dumps(r))
            continue
        f = lambda m: f"{m['mean']:.1f}/{m['p50']:.1f}/{m['p90']:.1f}/{m['p99']:.1f}"  # noqa: E731
        print(f"{conc:>4} {r['req_per_s']:>7.2f} {r['output_tok_per_s']:>9.1f} {f(r['ttft']):>27} "
              f"{f(r['tpot']):>23} {f(r['itl']):>23} {f(r['e2e']):>27} {r['errors']}")


if __name__ == "__main__":
    main()
