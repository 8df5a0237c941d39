#!/usr/bin/python3
"""Independent reference for the AndyLLM LLaMA model (tests/model/test_reference.cpp).

Written from the Hugging Face LlamaForCausalLM equations (transformers' modeling_llama.py),
in float64 with plain PyTorch ops, no AndyLLM code. Reads what the C++ test wrote:
  DIR/meta.json   {"config": {...}, "tensors": [{"name", "file", "shape"}], "tokens": {...},
                   "targets": {...}}   (weights raw little-endian float32, ids raw int64)
and writes DIR/logits.bin (float64 [B, T, vocab]), DIR/loss.txt and DIR/grad/<name>.bin
(float64, the gradient of the mean loss over targets != -100).
Run with Debian's /usr/bin/python3 (python3-torch, python3-numpy).
"""
import json
import math
import os
import sys

import numpy as np
import torch


def rms_norm(x, w, eps):
    # LlamaRMSNorm: x * rsqrt(mean(x^2) + eps), then scale.
    var = x.pow(2).mean(-1, keepdim=True)
    return w * (x * torch.rsqrt(var + eps))


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_tables(head_dim, seq_len, theta):
    # LlamaRotaryEmbedding (default rope type).
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    t = torch.arange(seq_len, dtype=torch.float64)
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def repeat_kv(x, n_rep):
    b, h, t, d = x.shape
    if n_rep == 1:
        return x
    return x[:, :, None, :, :].expand(b, h, n_rep, t, d).reshape(b, h * n_rep, t, d)


def forward(cfg, W, tokens):
    dim, n_head, n_kv = cfg["dim"], cfg["n_head"], cfg["n_kv_head"]
    hd = dim // n_head
    b, t = tokens.shape
    cos, sin = rope_tables(hd, t, cfg["rope_theta"])
    h = W["model.embed_tokens.weight"][tokens]
    mask = torch.full((t, t), float("-inf"), dtype=torch.float64).triu(1)
    for l in range(cfg["n_layer"]):
        p = f"model.layers.{l}."
        x = rms_norm(h, W[p + "input_layernorm.weight"], cfg["norm_eps"])
        q = (x @ W[p + "self_attn.q_proj.weight"].T).view(b, t, n_head, hd).transpose(1, 2)
        k = (x @ W[p + "self_attn.k_proj.weight"].T).view(b, t, n_kv, hd).transpose(1, 2)
        v = (x @ W[p + "self_attn.v_proj.weight"].T).view(b, t, n_kv, hd).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k = repeat_kv(k, n_head // n_kv)
        v = repeat_kv(v, n_head // n_kv)
        att = (q @ k.transpose(2, 3)) / math.sqrt(hd) + mask
        att = torch.softmax(att, dim=-1)
        o = (att @ v).transpose(1, 2).reshape(b, t, n_head * hd)
        h = h + o @ W[p + "self_attn.o_proj.weight"].T
        x = rms_norm(h, W[p + "post_attention_layernorm.weight"], cfg["norm_eps"])
        gate = x @ W[p + "mlp.gate_proj.weight"].T
        up = x @ W[p + "mlp.up_proj.weight"].T
        h = h + (torch.nn.functional.silu(gate) * up) @ W[p + "mlp.down_proj.weight"].T
    h = rms_norm(h, W["model.norm.weight"], cfg["norm_eps"])
    head = W["model.embed_tokens.weight"] if cfg["tie_embeddings"] else W["lm_head.weight"]
    return h @ head.T


def main(d):
    with open(os.path.join(d, "meta.json")) as f:
        meta = json.load(f)
    cfg = meta["config"]
    W = {}
    for e in meta["tensors"]:
        a = np.fromfile(os.path.join(d, e["file"]), dtype="<f4").reshape(e["shape"])
        W[e["name"]] = torch.from_numpy(a.astype(np.float64)).requires_grad_(True)

    def ids(key):
        e = meta[key]
        return torch.from_numpy(np.fromfile(os.path.join(d, e["file"]), dtype="<i8").reshape(e["shape"]))

    tokens, targets = ids("tokens"), ids("targets")
    logits = forward(cfg, W, tokens)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                             ignore_index=-100)
    loss.backward()
    logits.detach().numpy().astype("<f8").tofile(os.path.join(d, "logits.bin"))
    with open(os.path.join(d, "loss.txt"), "w") as f:
        f.write(repr(loss.item()) + "\n")
    os.makedirs(os.path.join(d, "grad"), exist_ok=True)
    for name, w in W.items():
        w.grad.numpy().astype("<f8").tofile(os.path.join(d, "grad", name + ".bin"))
    print(f"reference_llama.py: torch {torch.__version__}, logits {tuple(logits.shape)}, loss {loss.item():.10f}")


if __name__ == "__main__":
    main(sys.argv[1])
