#!/usr/bin/env python3
"""The PyTorch peer of the decode benchmark (issue 15): a Llama decoder on the shapes of a
config.json, random bf16 weights on the GPU, a static KV cache of `context + steps` positions
per sequence, and one decode step (all layers, the lm_head and a greedy argmax) captured in a
CUDA graph and replayed, the way gpt-fast runs it (its attention reads the whole static cache
under a mask). Prints one JSON object: milliseconds per decode step for each batch size, and
the weight bytes a step reads.

    python3 torch_decode_peer.py CONFIG.json --batch 1,8,64 --context 512 --steps 64

Runs on the GPU machine (PyTorch with CUDA); `--device cpu --no-graph` runs the same code on
a CPU for a dry run at small shapes.
"""
import argparse
import json
import time

import torch
import torch.nn.functional as F


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("--batch", default="1,8,64")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--layers", type=int, default=0, help="0: the config's")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--no-graph", action="store_true")
    a = ap.parse_args()
    c = json.load(open(a.config))
    dev, dt = torch.device(a.device), torch.bfloat16
    h, inter, vocab = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    heads = c["num_attention_heads"]
    kv_heads = c.get("num_key_value_heads", heads)
    d = c.get("head_dim", h // heads)
    layers = a.layers or c["num_hidden_layers"]
    eps, theta = c.get("rms_norm_eps", 1e-5), c.get("rope_theta", 10000.0)
    torch.manual_seed(0)
    # grouped-query attention inside SDPA (PyTorch 2.5+), else K/V heads repeated
    gqa = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")

    def w(rows, cols):
        return (torch.randn(rows, cols, device=dev, dtype=dt) / cols**0.5).contiguous()

    embed = w(vocab, h)
    lm_head = w(vocab, h)
    ones = torch.ones(h, device=dev, dtype=dt)
    L = [
        dict(
            wqkv=w((heads + 2 * kv_heads) * d, h),
            wo=w(h, heads * d),
            wgu=w(2 * inter, h),
            wd=w(h, inter),
        )
        for _ in range(layers)
    ]
    weight_bytes = 2 * (lm_head.numel() + sum(sum(t.numel() for t in l.values()) for l in L))
    t_max = a.context + a.steps + 1
    inv = 1.0 / theta ** (torch.arange(0, d, 2, device=dev, dtype=torch.float32) / d)
    ang = torch.arange(t_max, device=dev, dtype=torch.float32)[:, None] * inv[None, :]
    cos_t, sin_t = ang.cos(), ang.sin()

    def norm(x):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(dt) * ones

    def rope(x, cos, sin):  # x [b, n, 1, d]; half rotation (HF layout)
        x1, x2 = x[..., : d // 2].float(), x[..., d // 2 :].float()
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).to(dt)

    out = {
        "weight_bytes": weight_bytes,
        "ms_per_step": {},
        "graph": not a.no_graph,
        "torch": torch.__version__,
        "sdpa_gqa": gqa,
    }
    for b in [int(x) for x in a.batch.split(",")]:
        kc = [torch.zeros(b, kv_heads, t_max, d, device=dev, dtype=dt) for _ in L]
        vc = [torch.zeros_like(k) for k in kc]
        tok = torch.randint(0, vocab, (b,), device=dev)
        pos = torch.full((1,), a.context, device=dev, dtype=torch.long)

        def step():
            cos = cos_t.index_select(0, pos)[None, None]  # [1, 1, 1, d/2]
            sin = sin_t.index_select(0, pos)[None, None]
            mask = (torch.arange(t_max, device=dev) <= pos)[None, None, None, :]
            x = embed.index_select(0, tok)  # [b, h]
            for l, k_cache, v_cache in zip(L, kc, vc):
                qkv = norm(x) @ l["wqkv"].t()
                q, k, v = qkv.split([heads * d, kv_heads * d, kv_heads * d], -1)
                q = rope(q.view(b, heads, 1, d), cos, sin)
                k = rope(k.view(b, kv_heads, 1, d), cos, sin)
                k_cache.index_copy_(2, pos, k)
                v_cache.index_copy_(2, pos, v.view(b, kv_heads, 1, d))
                if gqa:
                    att = F.scaled_dot_product_attention(
                        q, k_cache, v_cache, attn_mask=mask, enable_gqa=kv_heads != heads
                    )
                else:
                    rep = heads // kv_heads
                    kr, vr = (t.repeat_interleave(rep, 1) for t in (k_cache, v_cache))
                    att = F.scaled_dot_product_attention(q, kr, vr, attn_mask=mask)
                x = x + att.reshape(b, heads * d) @ l["wo"].t()
                g, u = (norm(x) @ l["wgu"].t()).chunk(2, -1)
                x = x + (F.silu(g) * u) @ l["wd"].t()
            logits = norm(x) @ lm_head.t()
            tok.copy_(logits.argmax(-1))
            pos.add_(1)

        sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
        if a.no_graph:
            run = step
        else:
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(3):  # warm-up (cuBLAS handles, workspaces)
                    step()
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                step()
            run = g.replay
        pos.fill_(a.context)
        run()
        sync()
        pos.fill_(a.context)
        t = time.perf_counter()
        for _ in range(a.steps):
            run()
        sync()
        out["ms_per_step"][str(b)] = (time.perf_counter() - t) * 1e3 / a.steps
        del kc, vc
    print(json.dumps(out))


if __name__ == "__main__":
    main()
