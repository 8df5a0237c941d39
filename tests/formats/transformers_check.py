#!/usr/bin/env python3
"""Loads an `andyllm export --format hf` directory with the real Hugging Face stack
(transformers' AutoModelForCausalLM and AutoTokenizer) and checks it against AndyLLM's own
greedy completions (`andyllm generate --temperature 0 --ignore_eos --output FILE`, JSON lines
with prompt, prompt_tokens, token_ids and text):

  - AutoTokenizer encodes each prompt to as many tokens as AndyLLM did;
  - greedy decoding with the transformers model (argmax of the last position, EOS not special,
    as --ignore_eos) produces the same token ids;
  - AutoTokenizer decodes those ids to the same text.

Needs torch and transformers (the GPU machine's Python has them; Debian's does not have
transformers). Runs on CUDA when there is one. Exit status 1 when anything differs.

  python3 tests/formats/transformers_check.py HF_DIR EXPECTED.jsonl
"""
import json
import sys

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    hf_dir, expected_path = sys.argv[1], sys.argv[2]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).to(device).eval()
    expected = [json.loads(line) for line in open(expected_path) if line.strip()]
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, {device}: "
          f"{type(model).__name__}, {type(tok).__name__}, {len(expected)} prompts")
    bad = 0
    for e in expected:
        ids = tok(e["prompt"]).input_ids
        same_len = len(ids) == e["prompt_tokens"]
        x = torch.tensor([ids], device=device)
        out = []
        with torch.no_grad():
            for _ in range(len(e["token_ids"])):
                nxt = int(model(x).logits[0, -1].argmax())
                out.append(nxt)
                x = torch.cat([x, torch.tensor([[nxt]], device=device)], 1)
        first = next((i for i, (a, b) in enumerate(zip(out, e["token_ids"])) if a != b), None)
        text = tok.decode(e["token_ids"], skip_special_tokens=True)
        same_text = text == e["text"]
        ok = same_len and first is None and same_text
        bad += 0 if ok else 1
        print(f"  {'ok  ' if ok else 'DIFF'} {e['prompt']!r}: prompt {len(ids)} tokens (ours {e['prompt_tokens']}), "
              f"{len(out)} greedy tokens {'identical' if first is None else f'first differ at {first}'}, "
              f"decoded text {'identical' if same_text else 'differs'}")
        if not same_text:
            print(f"    transformers: {text!r}\n    andyllm:      {e['text']!r}")
    print(f"transformers check: {len(expected) - bad}/{len(expected)} prompts identical "
          "(prompt length, greedy token ids, decoded text)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
