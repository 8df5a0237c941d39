#!/usr/bin/python3
"""The same LLaMA model and training step as `andyllm bench train`, in PyTorch, for
docs/PERFORMANCE.md (run by scripts/bench_train.sh with Debian's /usr/bin/python3, torch 1.13).

Model: Hugging Face LlamaForCausalLM equations (RMSNorm, RoPE, GQA, SwiGLU, tied embedding),
fp32 master weights (attention through F.scaled_dot_product_attention on --device cuda); step: forward, cross-entropy, backward, DDP gradient average (gloo) when
--ranks > 1, clip_grad_norm_, AdamW. Random tokens (the data path is not what is measured).

  /usr/bin/python3 scripts/bench_pytorch.py --dim 128 --n_layer 4 --n_head 8 --n_kv_head 4 \
      --vocab 4096 --seq 128 --batch 8 --ranks 2 --threads 1 --steps 20 --warmup 3 [--bf16]
  /usr/bin/python3 scripts/bench_pytorch.py --config configs/tiny.toml --ranks 2   # shapes from a run config
"""
import argparse
import math
import os
import sys
import time
import tomllib

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        # fp32 x (autocast's residual stream): fp32 out; a bf16 x (--bf16_residual): bf16 out.
        w = self.weight if x.dtype == torch.float32 else self.weight.to(x.dtype)
        return w * xf.to(x.dtype)


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


class Block(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.nh, self.nkv, self.hd = a.n_head, a.n_kv_head, a.dim // a.n_head
        ffn = a.ffn_dim or a.ffn_multiple_of * ((int(2 * 4 * a.dim / 3) + a.ffn_multiple_of - 1) // a.ffn_multiple_of)
        self.n1, self.n2 = RMSNorm(a.dim, 1e-5), RMSNorm(a.dim, 1e-5)
        self.q = nn.Linear(a.dim, self.nh * self.hd, bias=False)
        self.k = nn.Linear(a.dim, self.nkv * self.hd, bias=False)
        self.v = nn.Linear(a.dim, self.nkv * self.hd, bias=False)
        self.o = nn.Linear(self.nh * self.hd, a.dim, bias=False)
        self.gate = nn.Linear(a.dim, ffn, bias=False)
        self.up = nn.Linear(a.dim, ffn, bias=False)
        self.down = nn.Linear(ffn, a.dim, bias=False)

    def forward(self, h, cos, sin, mask, sdpa=False):
        b, t, _ = h.shape
        x = self.n1(h)
        q = self.q(x).view(b, t, self.nh, self.hd).transpose(1, 2)
        k = self.k(x).view(b, t, self.nkv, self.hd).transpose(1, 2)
        v = self.v(x).view(b, t, self.nkv, self.hd).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        rep = self.nh // self.nkv
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
        if sdpa:  # fused (flash) attention, as PyTorch 2.x users write it on GPUs
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = torch.softmax((q @ k.transpose(2, 3)) / math.sqrt(self.hd) + mask, dim=-1) @ v
        h = h + self.o(y.transpose(1, 2).reshape(b, t, -1))
        x = self.n2(h)
        return h + self.down(F.silu(self.gate(x)) * self.up(x))


class Llama(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.sdpa = a.device == "cuda"
        self.bf16_residual = a.bf16_residual
        self.embed = nn.Embedding(a.vocab, a.dim)
        self.layers = nn.ModuleList([Block(a) for _ in range(a.n_layer)])
        self.norm = RMSNorm(a.dim, 1e-5)
        hd = a.dim // a.n_head
        inv = 1.0 / (10000.0 ** (torch.arange(0, hd, 2).float() / hd))
        f = torch.outer(torch.arange(a.seq).float(), inv)
        emb = torch.cat((f, f), -1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)
        self.register_buffer("mask", torch.full((a.seq, a.seq), float("-inf")).triu(1), persistent=False)
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, tokens):
        h = self.embed(tokens)
        if self.bf16_residual:
            h = h.to(torch.bfloat16)
        for l in self.layers:
            h = l(h, self.cos, self.sin, self.mask, self.sdpa)
        return self.norm(h) @ self.embed.weight.T


def worker(rank, a):
    torch.set_num_threads(a.threads)
    torch.manual_seed(1234)
    if a.ranks > 1:
        dist.init_process_group("gloo", rank=rank, world_size=a.ranks)
    model = Llama(a).to(a.device)
    ddp = torch.nn.parallel.DistributedDataParallel(model) if a.ranks > 1 else model
    decay = [p for n, p in model.named_parameters() if p.dim() == 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() == 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
    g = torch.Generator().manual_seed(rank)
    times = []
    for step in range(a.steps):
        tokens = torch.randint(a.vocab, (a.batch, a.seq + 1), generator=g).to(a.device)
        if a.device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(a.device, dtype=torch.bfloat16, enabled=a.bf16):
            logits = ddp(tokens[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, a.vocab), tokens[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if a.device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    timed = torch.tensor([sum(times[a.warmup:])], dtype=torch.float64)
    if a.ranks > 1:
        dist.all_reduce(timed, op=dist.ReduceOp.MAX)
    if rank == 0:
        tokens = (a.steps - a.warmup) * a.batch * a.seq * a.ranks
        print(f"pytorch {torch.__version__}: {a.ranks} rank(s) x {a.threads} thread(s), "
              f"{('bf16 autocast' + (', bf16 residual' if a.bf16_residual else '')) if a.bf16 else 'fp32'}: step {1000 * timed.item() / (a.steps - a.warmup):.1f} ms, "
              f"tokens/s {tokens / timed.item():.0f}, last loss {loss.item():.3f}")
    if a.ranks > 1:
        dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser()
    for name, default in [("dim", 128), ("n_layer", 4), ("n_head", 8), ("n_kv_head", 4), ("vocab", 4096),
                          ("seq", 128), ("batch", 8), ("ranks", 2), ("threads", 1), ("steps", 20),
                          ("warmup", 3), ("ffn_multiple_of", 32)]:
        p.add_argument("--" + name, type=int, default=default)
    p.add_argument("--ffn_dim", type=int, default=0)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--residual", choices=["fp32", "bf16"],
                   help="with --bf16: the residual stream's dtype (default: the config's precision.fp32_residual, "
                        "else fp32 as autocast keeps it)")
    p.add_argument("--device", default="cpu", help="cpu, or cuda (one rank; fused attention)")
    p.add_argument("--config", help="AndyLLM run config (TOML): model shapes, seq_len and batch_size from it")
    a = p.parse_args()
    given = {arg[2:].split("=")[0] for arg in sys.argv[1:] if arg.startswith("--")}  # flags beat the config
    if a.config:
        with open(a.config, "rb") as f:
            cfg = tomllib.load(f)
        m, d, t = cfg.get("model", {}), cfg.get("data", {}), cfg.get("train", {})
        for ours, key, section in [("dim", "dim", m), ("n_layer", "n_layer", m), ("n_head", "n_head", m),
                                   ("n_kv_head", "n_kv_head", m), ("vocab", "vocab_size", m),
                                   ("ffn_multiple_of", "ffn_multiple_of", m), ("ffn_dim", "ffn_dim", m),
                                   ("seq", "seq_len", d), ("batch", "batch_size", t)]:
            if key in section and ours not in given:
                setattr(a, ours, int(section[key]))
        if a.residual is None and cfg.get("precision", {}).get("fp32_residual", True) is False:
            a.residual = "bf16"
    a.bf16_residual = a.bf16 and a.residual == "bf16"
    if a.ranks > 1:
        # Chosen once here (the workers inherit it), so every rank meets at the same port.
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
        mp.spawn(worker, args=(a,), nprocs=a.ranks, join=True)
    else:
        worker(0, a)


if __name__ == "__main__":
    main()
