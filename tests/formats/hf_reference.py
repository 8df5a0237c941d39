#!/usr/bin/python3
"""Runs a Hugging Face model directory the way transformers would read it, without AndyLLM code.

Reads config.json with LlamaConfig's field names and defaults, and the weights from
model.safetensors (or the shards model.safetensors.index.json lists) by parsing the
safetensors format itself (8-byte little-endian header length, JSON header, raw little-endian
data; F32, BF16 and F16). Then greedy-decodes each prompt with the float64 LLaMA of
tests/model/reference_llama.py (written from transformers' modeling_llama.py), stopping at
config.json's eos_token_id. Used by tests/formats/test_export_e2e.cpp.

  /usr/bin/python3 hf_reference.py HF_DIR PROMPTS.json MAX_TOKENS
PROMPTS.json: a JSON array of token-id arrays. Prints a JSON array of generated id arrays.
Run with Debian's /usr/bin/python3 (python3-torch, python3-numpy).
"""
import json
import os
import struct
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "model"))
from reference_llama import forward  # noqa: E402


def read_safetensors(path):
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    base = 8 + n
    out = {}
    for name, e in header.items():
        if name == "__metadata__":
            continue
        begin, end = e["data_offsets"]
        raw = data[base + begin:base + end]
        if e["dtype"] == "F32":
            a = np.frombuffer(raw, dtype="<f4").astype(np.float64)
        elif e["dtype"] == "F16":
            a = np.frombuffer(raw, dtype="<f2").astype(np.float64)
        elif e["dtype"] == "BF16":
            a = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32).astype(np.float64)
        else:
            raise SystemExit(f"{path}: {name}: dtype {e['dtype']} not handled")
        out[name] = torch.from_numpy(a.reshape(e["shape"]).copy())
    return out


def read_weights(d):
    index = os.path.join(d, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    W = {}
    for file in files:
        W.update(read_safetensors(os.path.join(d, file)))
    return W


def main(d, prompts_file, max_tokens):
    with open(os.path.join(d, "config.json")) as f:
        c = json.load(f)
    assert c["model_type"] == "llama" and c.get("hidden_act", "silu") == "silu"
    cfg = {
        "dim": c["hidden_size"],
        "n_layer": c["num_hidden_layers"],
        "n_head": c["num_attention_heads"],
        "n_kv_head": c.get("num_key_value_heads", c["num_attention_heads"]),
        "norm_eps": c.get("rms_norm_eps", 1e-6),
        "rope_theta": c.get("rope_theta", 10000.0),
        "tie_embeddings": c.get("tie_word_embeddings", False),
    }
    W = read_weights(d)
    eos = c.get("eos_token_id")
    with open(prompts_file) as f:
        prompts = json.load(f)
    results = []
    with torch.no_grad():
        for p in prompts:
            ids, out = list(p), []
            for _ in range(max_tokens):
                logits = forward(cfg, W, torch.tensor([ids]))
                nxt = int(logits[0, -1].argmax())
                if nxt == eos:
                    break
                out.append(nxt)
                ids.append(nxt)
            results.append(out)
    print(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
