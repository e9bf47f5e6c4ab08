#!/usr/bin/env python3
"""Independent reference for the engine: a plain numpy Llama forward pass and tokenizer.

Nothing here shares code with the Rust engine or with the `tokenizers` library:
  * safetensors is parsed by hand (8-byte header length, JSON header, raw bytes);
  * the tokenizer is a from-scratch byte-level BPE that reads the vocabulary, merges and
    control tokens straight from the GGUF the model was prepared from (llama.cpp's "smollm"
    pre-tokenizer: single digits, then the GPT-2 split regex);
  * chat templates are rendered with Python's jinja2, not minijinja;
  * attention is a dense causal softmax over a contiguous cache (no pages).

Commands:
  golden      prompts in (JSON), token ids, first-step logits (raw f32 files) and greedy tokens out
  check-gguf  compares the prepared bf16 safetensors model with a forward pass computed from the
              original Q4_1 GGUF (own dequantisation, llama.cpp's adjacent-pair RoPE on the
              permuted rows); catches a wrong q/k un-permutation or dequantisation
  tokenize    prints the token ids of a text (or of each text of a JSON list)
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np

# ----------------------------------------------------------------------------- weights


def load_safetensors(path):
    """Returns {name: float32 array}; bf16/f16/f32 only."""
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    n = int.from_bytes(bytes(raw[:8]), "little")
    header = json.loads(bytes(raw[8:8 + n]))
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        buf = np.asarray(raw[base + a:base + b])
        dt = info["dtype"]
        if dt == "BF16":
            arr = (buf.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        elif dt == "F16":
            arr = buf.view(np.float16).astype(np.float32)
        elif dt == "F32":
            arr = buf.view(np.float32).copy()
        else:
            raise SystemExit(f"reference: unsupported dtype {dt} for {name}")
        out[name] = arr.reshape(info["shape"])
    return out


class Weights:
    def __init__(self, cfg, tensors, rope_style="half"):
        self.cfg = cfg
        self.t = tensors
        self.rope_style = rope_style  # "half" (HF) or "pairs" (llama.cpp NORM on permuted rows)
        self.embed = tensors["model.embed_tokens.weight"]
        self.lm_head = tensors.get("lm_head.weight", self.embed)

    def layer(self, i, name):
        return self.t[f"model.layers.{i}.{name}.weight"]


# ----------------------------------------------------------------------------- model


def rms_norm(x, w, eps):
    var = np.mean(x * x, axis=-1, keepdims=True)
    return x / np.sqrt(var + eps) * w


def rope_inv_freq(cfg, head_dim):
    base = cfg.get("rope_theta", 10000.0)
    inv = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    scaling = cfg.get("rope_scaling") or None
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind == "linear":
            inv = inv / scaling["factor"]
        elif kind == "llama3":
            factor = scaling["factor"]
            lo = scaling.get("low_freq_factor", 1.0)
            hi = scaling.get("high_freq_factor", 4.0)
            old = scaling["original_max_position_embeddings"]
            wavelen = 2 * np.pi / inv
            smooth = (old / wavelen - lo) / (hi - lo)
            scaled = np.where(wavelen > old / lo, inv / factor, inv)
            mid = (wavelen <= old / lo) & (wavelen >= old / hi)
            inv = np.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)
        else:
            raise SystemExit(f"reference: rope_scaling type {kind} not implemented")
    return inv


def apply_rope(x, positions, inv_freq, style):
    # x: [T, heads, head_dim]
    ang = positions[:, None].astype(np.float64) * inv_freq[None, :]  # [T, hd/2]
    cos = np.cos(ang).astype(np.float32)[:, None, :]
    sin = np.sin(ang).astype(np.float32)[:, None, :]
    if style == "half":
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
        return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x2 * cos + x1 * sin
    return out


def round_bf16(x):
    """f32 values rounded to the nearest bf16 (ties to even), kept as f32."""
    b = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
    return b.astype(np.uint32).view(np.float32).reshape(np.shape(x))


def to_bf16_input(x):
    """A product's input rounded to bf16 as an engine running bf16 products does (ties to
    even; zero and denormals to a signed zero, as x86's vcvtneps2bf16), kept as f32."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    tiny = np.abs(x) < np.float32(2.0 ** -126)
    return np.where(tiny, np.copysign(np.float32(0.0), x), round_bf16(x))


class Sequence:
    """Dense KV cache of one sequence: k, v per layer, [len, kv_heads, head_dim]; with
    `kv_bf16` the cached values are rounded to bf16 as they are stored (an engine's bf16 KV
    cache), attention still computes in f32. With `act_bf16` every matrix product takes its
    input rounded to bf16 (`--dtype bfloat16`); its output, the norms, attention and the
    residual stay f32."""

    def __init__(self, n_layers, kv_bf16=False, act_bf16=False):
        self.k = [None] * n_layers
        self.v = [None] * n_layers
        self.len = 0
        self.store = round_bf16 if kv_bf16 else (lambda x: x)
        self.act = to_bf16_input if act_bf16 else (lambda x: x)


def forward(w, seq, ids):
    """Runs `ids` (new tokens) through the model; returns logits [len(ids), vocab] (f32)."""
    cfg = w.cfg
    nh = cfg["num_attention_heads"]
    nkv = cfg.get("num_key_value_heads", nh)
    hd = cfg.get("head_dim") or cfg["hidden_size"] // nh
    eps = cfg["rms_norm_eps"]
    inv_freq = rope_inv_freq(cfg, hd)
    T = len(ids)
    pos = np.arange(seq.len, seq.len + T)
    x = w.embed[np.asarray(ids)].astype(np.float32)
    act = seq.act
    for i in range(cfg["num_hidden_layers"]):
        h = act(rms_norm(x, w.layer(i, "input_layernorm"), eps))
        q = (h @ w.layer(i, "self_attn.q_proj").T).reshape(T, nh, hd)
        k = (h @ w.layer(i, "self_attn.k_proj").T).reshape(T, nkv, hd)
        v = (h @ w.layer(i, "self_attn.v_proj").T).reshape(T, nkv, hd)
        q = apply_rope(q, pos, inv_freq, w.rope_style)
        k = apply_rope(k, pos, inv_freq, w.rope_style)
        k, v = seq.store(k), seq.store(v)
        seq.k[i] = k if seq.k[i] is None else np.concatenate([seq.k[i], k])
        seq.v[i] = v if seq.v[i] is None else np.concatenate([seq.v[i], v])
        K, V = seq.k[i], seq.v[i]  # [S, nkv, hd]
        S = K.shape[0]
        group = nh // nkv
        Kx = np.repeat(K, group, axis=1)  # [S, nh, hd]
        Vx = np.repeat(V, group, axis=1)
        # np.float32 scale: a numpy float64 scalar would silently promote everything to f64
        scores = np.einsum("thd,shd->hts", q, Kx) * np.float32(1.0 / np.sqrt(hd))
        mask = pos[:, None] < np.arange(S)[None, :]  # future positions
        scores = np.where(mask[None], -np.inf, scores)
        scores = scores - scores.max(axis=-1, keepdims=True)
        p = np.exp(scores)
        p /= p.sum(axis=-1, keepdims=True)
        attn = np.einsum("hts,shd->thd", p, Vx).reshape(T, nh * hd)
        x = x + act(attn) @ w.layer(i, "self_attn.o_proj").T
        h = act(rms_norm(x, w.layer(i, "post_attention_layernorm"), eps))
        g = h @ w.layer(i, "mlp.gate_proj").T
        u = h @ w.layer(i, "mlp.up_proj").T
        x = x + act((g / (1.0 + np.exp(-g))) * u) @ w.layer(i, "mlp.down_proj").T
    seq.len += T
    assert x.dtype == np.float32, x.dtype
    x = act(rms_norm(x, w.t["model.norm.weight"], eps))
    return (x @ w.lm_head.T).astype(np.float32)


def prompt_logprobs(logits, ids):
    """logprob of each prompt token after the first under the logits before it (float64)."""
    x = logits[:-1].astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    lse = (m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True)))[:, 0]
    nxt = np.asarray(ids[1:])
    return (x[np.arange(len(nxt)), nxt] - lse).tolist()


def step_stats(row):
    """(logprob of the greedy token, its logit's lead over the runner-up) of one logits row."""
    x = row.astype(np.float64)
    top2 = np.partition(x, -2)[-2:]
    m = top2[1]
    return float(-np.log(np.exp(x - m).sum())), float(top2[1] - top2[0])


def greedy(w, ids, steps, eos_ids, kv_bf16=False, act_bf16=False):
    """The first step's logits, the prompt's logprobs, `steps` greedy tokens, and for each
    token its logprob and lead over the runner-up (how near a tie the choice was)."""
    seq = Sequence(w.cfg["num_hidden_layers"], kv_bf16, act_bf16)
    logits = forward(w, seq, ids)
    first = logits[-1].copy()
    lps = prompt_logprobs(logits, ids)
    out, stats = [], []
    row = logits[-1]
    for _ in range(steps):
        nxt = int(np.argmax(row))
        out.append(nxt)
        stats.append(step_stats(row))
        if nxt in eos_ids:
            break
        row = forward(w, seq, [nxt])[-1]
    return first, lps, out, stats


# ----------------------------------------------------------------------------- tokenizer


def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def read_gguf_metadata(path, wanted):
    """The GGUF key/value metadata named in `wanted`, parsed by hand (the format: magic, version,
    tensor count, kv count, then typed key/value pairs), much faster than gguf.GGUFReader."""
    import struct

    data = Path(path).read_bytes()
    if data[:4] != b"GGUF":
        raise SystemExit(f"reference: {path} is not a GGUF file")
    pos = 4 + 4 + 8
    (n_kv,) = struct.unpack_from("<Q", data, pos)
    pos += 8
    scalar = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
              10: "<Q", 11: "<q", 12: "<d"}

    def read_str(p):
        (n,) = struct.unpack_from("<Q", data, p)
        return data[p + 8:p + 8 + n].decode("utf-8"), p + 8 + n

    def read_value(ty, p):
        if ty == 8:
            return read_str(p)
        if ty == 9:
            sub, count = struct.unpack_from("<IQ", data, p)
            p += 12
            if sub in scalar:
                fmt = scalar[sub]
                size = struct.calcsize(fmt)
                vals = list(struct.unpack_from("<" + fmt[1] * count, data, p))
                return vals, p + size * count
            out = []
            for _ in range(count):
                v, p = read_value(sub, p)
                out.append(v)
            return out, p
        fmt = scalar[ty]
        return struct.unpack_from(fmt, data, p)[0], p + struct.calcsize(fmt)

    out = {}
    for _ in range(n_kv):
        key, pos = read_str(pos)
        (ty,) = struct.unpack_from("<I", data, pos)
        value, pos = read_value(ty, pos + 4)
        if key in wanted:
            out[key] = value
    missing = wanted - out.keys()
    if missing:
        raise SystemExit(f"reference: {path} lacks {sorted(missing)}")
    return out


class BpeTokenizer:
    def __init__(self, gguf_path):
        import regex

        meta = read_gguf_metadata(gguf_path, {"tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                                              "tokenizer.ggml.merges"})
        self.tokens = meta["tokenizer.ggml.tokens"]
        types = meta["tokenizer.ggml.token_type"]
        merges = meta["tokenizer.ggml.merges"]
        self.ids = {t: i for i, t in enumerate(self.tokens)}
        self.ranks = {tuple(m.split(" ")): i for i, m in enumerate(merges)}
        self.control = [t for t, ty in zip(self.tokens, types) if int(ty) == 3]
        self.byte_enc = bytes_to_unicode()
        self.byte_dec = {c: b for b, c in self.byte_enc.items()}
        self.split_special = regex.compile("(" + "|".join(regex.escape(t) for t in self.control) + ")")
        self.digits = regex.compile(r"\p{N}")
        self.gpt2 = regex.compile(
            r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
        self.cache = {}

    def bpe(self, word):
        if word in self.cache:
            return self.cache[word]
        parts = list(word)
        while len(parts) > 1:
            best = None
            for i in range(len(parts) - 1):
                r = self.ranks.get((parts[i], parts[i + 1]))
                if r is not None and (best is None or r < best[0]):
                    best = (r, i)
            if best is None:
                break
            i = best[1]
            parts = parts[:i] + [parts[i] + parts[i + 1]] + parts[i + 2:]
        ids = [self.ids[p] for p in parts]
        self.cache[word] = ids
        return ids

    def encode(self, text):
        out = []
        for chunk in self.split_special.split(text):
            if not chunk:
                continue
            if chunk in self.ids and chunk in self.control:
                out.append(self.ids[chunk])
                continue
            # Digits split first (each digit its own piece), then the GPT-2 regex on the rest.
            pieces, last = [], 0
            for m in self.digits.finditer(chunk):
                pieces.append(chunk[last:m.start()])
                pieces.append(m.group())
                last = m.end()
            pieces.append(chunk[last:])
            for piece in pieces:
                for word in self.gpt2.findall(piece):
                    out.extend(self.bpe("".join(self.byte_enc[b] for b in word.encode("utf-8"))))
        return out

    def decode(self, ids):
        data = bytearray()
        for i in ids:
            tok = self.tokens[i]
            if tok in self.control:
                data.extend(tok.encode())
            else:
                data.extend(self.byte_dec[c] for c in tok)
        return data.decode("utf-8", errors="replace")


def render_chat(tokenizer_config, messages):
    import jinja2

    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    tpl = env.from_string(tokenizer_config["chat_template"])
    return tpl.render(messages=messages, add_generation_prompt=True,
                      bos_token=tokenizer_config.get("bos_token", ""),
                      eos_token=tokenizer_config.get("eos_token", ""))


# ----------------------------------------------------------------------------- gguf path


def dequant_q4_1(data, rows, cols):
    blocks = data.reshape(rows, cols // 32, 20)
    d = blocks[..., 0:2].copy().view(np.float16).astype(np.float32)
    m = blocks[..., 2:4].copy().view(np.float16).astype(np.float32)
    qs = blocks[..., 4:20]
    lo = (qs & 0x0F).astype(np.float32)
    hi = (qs >> 4).astype(np.float32)
    q = np.concatenate([lo, hi], axis=-1)  # first 16 values are the low nibbles
    return (q * d + m).reshape(rows, cols)


def dequant_q4_0(data, rows, cols):
    # 18-byte blocks: f16 scale d, 16 bytes of nibbles (low nibbles: values 0..15, high: 16..31);
    # value = d * (nibble - 8)
    blocks = data.reshape(rows, cols // 32, 18)
    d = blocks[..., 0:2].copy().view(np.float16).astype(np.float32)
    qs = blocks[..., 2:18]
    q = np.concatenate([(qs & 0x0F), (qs >> 4)], axis=-1).astype(np.float32) - 8.0
    return (q * d).reshape(rows, cols)


def dequant_q8_0(data, rows, cols):
    blocks = data.reshape(rows, cols // 32, 34)
    d = blocks[..., 0:2].copy().view(np.float16).astype(np.float32)
    q = blocks[..., 2:34].copy().view(np.int8).astype(np.float32)
    return (q * d).reshape(rows, cols)


def dequant_q5_0(data, rows, cols):
    # 22-byte blocks: f16 scale d, u32 qh (bit j: the fifth bit of value j), 16 bytes of low
    # nibbles as Q4_0's; value = d * (q - 16)
    blocks = data.reshape(rows, cols // 32, 22)
    d = blocks[..., 0:2].copy().view(np.float16).astype(np.float32)
    qh = blocks[..., 2:6].copy().view(np.uint32)  # (rows, nb, 1)
    qs = blocks[..., 6:22]
    low = np.concatenate([(qs & 0x0F), (qs >> 4)], axis=-1).astype(np.uint32)
    high = (qh >> np.arange(32, dtype=np.uint32)) & 1
    q = (low | (high << 4)).astype(np.float32) - 16.0
    return (q * d).reshape(rows, cols)


def dequant_q4_k(data, rows, cols):
    # 144-byte super-blocks of 256 values: f16 d, f16 dmin, 12 bytes of eight 6-bit (scale, min)
    # pairs, 128 bytes of nibbles (per 64 values: 32 bytes, low nibbles the first 32 values,
    # high nibbles the next 32); value = d * scale_j * q - dmin * min_j for the j-th 32 values
    blocks = data.reshape(rows, cols // 256, 144)
    d = blocks[..., 0:2].copy().view(np.float16).astype(np.float32)
    dmin = blocks[..., 2:4].copy().view(np.float16).astype(np.float32)
    s = blocks[..., 4:16].astype(np.uint32)
    # pieces 0..3: low 6 bits of bytes 0..3 (scale) and 4..7 (min); pieces 4..7: the nibbles of
    # bytes 8..11 (scale low, min high) completed by the top 2 bits of bytes 0..3 / 4..7
    scale = np.concatenate([s[..., 0:4] & 63, (s[..., 8:12] & 15) | ((s[..., 0:4] >> 6) << 4)], axis=-1)
    mins = np.concatenate([s[..., 4:8] & 63, (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)], axis=-1)
    qs = blocks[..., 16:144].reshape(rows, cols // 256, 4, 32)
    q = np.stack([qs & 0x0F, qs >> 4], axis=3).reshape(rows, cols // 256, 8, 32).astype(np.float32)
    out = (d * scale.astype(np.float32))[..., None] * q - (dmin * mins.astype(np.float32))[..., None]
    return out.reshape(rows, cols)


def dequant_q6_k(data, rows, cols):
    # 210-byte super-blocks of 256 values: 128 bytes ql (low 4 bits), 64 bytes qh (high 2 bits),
    # 16 int8 scales (one per 16 consecutive values), f16 d. In each half of 128 values (ql 64
    # bytes, qh 32 bytes), value 32*g + l takes ql[l] low (g=0), ql[l+32] low (g=1), ql[l] high
    # (g=2), ql[l+32] high (g=3), and bits 2g, 2g+1 of qh[l]; value = d * scale * (q - 32)
    nb = cols // 256
    blocks = data.reshape(rows, nb, 210)
    ql = blocks[..., 0:128].reshape(rows, nb, 2, 64)
    qh = blocks[..., 128:192].reshape(rows, nb, 2, 32)
    sc = blocks[..., 192:208].copy().view(np.int8).astype(np.float32)
    d = blocks[..., 208:210].copy().view(np.float16).astype(np.float32)
    groups = []
    for g in range(4):
        low = (ql[..., 32 * (g % 2):32 * (g % 2) + 32] >> (4 * (g // 2))) & 0x0F
        high = (qh >> (2 * g)) & 3
        groups.append((low | (high << 4)).astype(np.float32) - 32.0)
    q = np.stack(groups, axis=3).reshape(rows, nb, 16, 16)  # [.., half, g, l] -> 16 runs of 16
    return (d[..., None] * sc[..., None] * q).reshape(rows, cols)


DEQUANT = {"Q8_0": dequant_q8_0, "Q4_0": dequant_q4_0, "Q4_1": dequant_q4_1, "Q5_0": dequant_q5_0,
           "Q4_K": dequant_q4_k, "Q6_K": dequant_q6_k}


def load_gguf_weights(path):
    import gguf

    r = gguf.GGUFReader(str(path))
    names = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
             "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
             "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
             "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
             "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    out = {}
    for t in r.tensors:
        dims = [int(d) for d in t.shape.tolist()]
        raw = np.asarray(t.data)
        if t.tensor_type.name == "F32":
            arr = raw.astype(np.float32).reshape(list(reversed(dims)))
        elif t.tensor_type.name in DEQUANT:
            arr = DEQUANT[t.tensor_type.name](raw.view(np.uint8), dims[1], dims[0])
        elif t.tensor_type.name in ("F16", "BF16"):
            bits = raw.view(np.uint16).astype(np.uint32)
            arr = (bits << 16).view(np.float32) if t.tensor_type.name == "BF16" else \
                raw.view(np.float16).astype(np.float32)
            arr = arr.reshape(list(reversed(dims)))
        else:
            raise SystemExit(f"reference: GGUF type {t.tensor_type.name} not handled")
        parts = t.name.split(".")
        if parts[0] == "blk":
            name = f"model.layers.{parts[1]}.{names[parts[2]]}.weight"
        else:
            name = f"{names[parts[0]]}.weight"
        out[name] = arr
    return out


# ----------------------------------------------------------------------------- commands


def model_paths(model_dir):
    model_dir = Path(model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    tok_cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    return model_dir, cfg, tok_cfg


def default_gguf(model_dir):
    return Path(model_dir).parent / ".cache" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def prompt_ids(tok, tok_cfg, prompt):
    if prompt.get("chat"):
        text = render_chat(tok_cfg, [{"role": "user", "content": prompt["text"]}])
    else:
        text = prompt["text"]
    return text, tok.encode(text)


def cmd_golden(args):
    model_dir, cfg, tok_cfg = model_paths(args.model)
    if args.gguf_weights:
        # the GGUF's own weights, dequantized here, in llama.cpp's row order (RoPE on pairs)
        w = Weights(cfg, load_gguf_weights(args.gguf_weights), rope_style="pairs")
    else:
        w = Weights(cfg, load_safetensors(model_dir / "model.safetensors"))
    tok = BpeTokenizer(args.gguf or default_gguf(model_dir))
    prompts = json.loads(args.prompts)
    eos = cfg["eos_token_id"]
    eos_ids = set(eos if isinstance(eos, list) else [eos])
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for i, prompt in enumerate(prompts):
        text, ids = prompt_ids(tok, tok_cfg, prompt)
        first, lps, tokens, stats = greedy(w, ids, args.steps, eos_ids,
                                           args.kv_dtype == "bf16", args.dtype == "bfloat16")
        logits_file = out_dir / f"logits_{i}.f32"
        first.astype("<f4").tofile(logits_file)
        results.append({"rendered": text, "input_ids": ids, "greedy_ids": tokens,
                        "greedy_text": tok.decode(tokens), "logits_file": str(logits_file),
                        "prompt_logprobs": lps,
                        "greedy_logprobs": [lp for lp, _ in stats],
                        "greedy_leads": [lead for _, lead in stats]})
    print(json.dumps({"results": results}))


def cmd_check_gguf(args):
    model_dir, cfg, tok_cfg = model_paths(args.model)
    gguf_path = args.gguf or default_gguf(model_dir)
    tok = BpeTokenizer(gguf_path)
    ours = Weights(cfg, load_safetensors(model_dir / "model.safetensors"), rope_style="half")
    orig = Weights(cfg, load_gguf_weights(gguf_path), rope_style="pairs")
    worst = 0.0
    for text in args.texts:
        ids = tok.encode(text)
        a = forward(ours, Sequence(cfg["num_hidden_layers"]), ids)
        b = forward(orig, Sequence(cfg["num_hidden_layers"]), ids)
        rel = float(np.linalg.norm(a - b) / np.linalg.norm(b))
        same = float(np.mean(np.argmax(a, -1) == np.argmax(b, -1)))
        worst = max(worst, rel)
        print(json.dumps({"text": text, "tokens": len(ids), "rel_err_all_positions": rel,
                          "argmax_agreement": same}))
    if worst > args.tolerance:
        raise SystemExit(f"check-gguf: relative logit error {worst:.4f} > {args.tolerance}")
    print(json.dumps({"ok": True, "worst_rel_err": worst}))


def cmd_tokenize(args):
    model_dir, cfg, tok_cfg = model_paths(args.model)
    tok = BpeTokenizer(args.gguf or default_gguf(model_dir))
    if args.json:
        print(json.dumps([tok.encode(t) for t in json.loads(args.text)]))
    else:
        print(json.dumps(tok.encode(args.text)))


def main():
    root = Path(__file__).resolve().parent.parent
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(root / "models" / "SmolLM2-135M-Instruct"))
    ap.add_argument("--gguf", default=None, help="GGUF the model was prepared from")
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("golden")
    g.add_argument("--prompts", required=True, help='JSON list of {"text", "chat"}')
    g.add_argument("--steps", type=int, default=32)
    g.add_argument("--out-dir", required=True)
    g.add_argument("--kv-dtype", choices=["fp32", "bf16"], default="fp32",
                   help="the KV cache's element type (bf16: values rounded as they are stored)")
    g.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="the matrix products' inputs (bfloat16: rounded to bf16, as --dtype bfloat16)")
    g.add_argument("--gguf-weights", default=None,
                   help="run on this GGUF's weights (dequantized in numpy) instead of the safetensors")
    c = sub.add_parser("check-gguf")
    c.add_argument("--tolerance", type=float, default=0.05)
    c.add_argument("texts", nargs="+")
    t = sub.add_parser("tokenize")
    t.add_argument("text", help="a text, or with --json a JSON list of texts")
    t.add_argument("--json", action="store_true")
    args = ap.parse_args()
    {"golden": cmd_golden, "check-gguf": cmd_check_gguf, "tokenize": cmd_tokenize}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
