#!/usr/bin/env python3
"""Writes a GGUF of the prepared model: BF16 (for llama.cpp, the peer in benches/vs_llamacpp.py),
or quantized to Q8_0, Q4_0, Q4_1 or Q5_0 by gguf-py's quantizers (test files of the formats the
shipped Q4_1 file does not use, and the reference bytes `--quantization` must reproduce;
tests/gguf.rs). Q4_1 needs --out: its default name is the shipped file's.

Q4_K_M mixes formats per tensor as llama.cpp's llama-quantize does for that file type: Q6_K for
the embedding (tied output), for attn_v and ffn_down of the layers `use_more_bits` picks, Q4_K
elsewhere; rows that are not whole 256-value super-blocks (this model's 576-wide ones) fall back
to Q8_0 (for Q6_K) or Q5_0 (for Q4_K). gguf-py cannot quantize the k-quants, so Q4_K and Q6_K
are quantized here in numpy by a plain rule (per-piece min/max scales, 6- or 8-bit scale codes;
no search, unlike llama.cpp's): the bytes are valid k-quant blocks, not llama.cpp's bytes.

The tensors are the prepared model's bf16 weights (bit for bit in BF16), with llama.cpp's q/k row
permutation re-applied (its LLAMA graph rotates adjacent pairs); norms are F32 as llama.cpp's
own converter writes them. Tokenizer and chat-template metadata are copied from the GGUF the
model was prepared from, with eos fixed to <|im_end|> (2) as in the prepared model.

  .venv/bin/python scripts/make_gguf.py [--type BF16|F16|Q8_0|Q4_0|Q4_1|Q5_0|Q4_K_M] [--model DIR] [--out FILE]
"""

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
FILE_TYPES = {"BF16": "MOSTLY_BF16", "F16": "MOSTLY_F16", "Q8_0": "MOSTLY_Q8_0", "Q4_0": "MOSTLY_Q4_0",
              "Q4_1": "MOSTLY_Q4_1", "Q5_0": "MOSTLY_Q5_0", "Q4_K_M": "MOSTLY_Q4_K_M"}

import gguf  # noqa: E402
from reference import load_safetensors  # noqa: E402


def permute(w, n_head):
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows (inverse of prepare_model's)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def quant_q4_k(x):
    """Q4_K super-blocks (144 bytes per 256 values) of a float32 matrix, rows whole super-blocks."""
    n = x.size // 256
    xb = x.reshape(n, 8, 32).astype(np.float32)
    lo = np.minimum(xb.min(-1), 0)
    scale, mins = (xb.max(-1) - lo) / 15, -lo
    d = (scale.max(-1) / 63).astype(np.float16)
    dmin = (mins.max(-1) / 63).astype(np.float16)

    def code(v, unit):
        unit = unit.astype(np.float32)[:, None]
        safe = np.where(unit > 0, unit, 1)
        return np.where(unit > 0, np.clip(np.round(v / safe), 0, 63), 0).astype(np.uint8)

    sc, m = code(scale, d), code(mins, dmin)
    step = d.astype(np.float32)[:, None] * sc
    shift = dmin.astype(np.float32)[:, None] * m
    safe = np.where(step > 0, step, 1)[..., None]
    q = np.where(step[..., None] > 0, np.clip(np.round((xb + shift[..., None]) / safe), 0, 15), 0)
    q = q.astype(np.uint8)
    packed = np.zeros((n, 12), np.uint8)
    packed[:, 0:4] = sc[:, 0:4] | ((sc[:, 4:8] >> 4) << 6)
    packed[:, 4:8] = m[:, 0:4] | ((m[:, 4:8] >> 4) << 6)
    packed[:, 8:12] = (sc[:, 4:8] & 15) | ((m[:, 4:8] & 15) << 4)
    qs = q[:, 0::2, :] | (q[:, 1::2, :] << 4)  # (n, 4, 32): pieces 2c (low) and 2c + 1 (high)
    out = np.concatenate([d.view(np.uint8).reshape(n, 2), dmin.view(np.uint8).reshape(n, 2), packed,
                          qs.reshape(n, 128)], axis=1)
    return out.reshape(x.shape[0], -1)


def quant_q6_k(x):
    """Q6_K super-blocks (210 bytes per 256 values) of a float32 matrix, rows whole super-blocks."""
    n = x.size // 256
    xb = x.reshape(n, 16, 16).astype(np.float32)
    big = np.take_along_axis(xb, np.abs(xb).argmax(-1)[..., None], -1)[..., 0]

    def err(s):
        safe = np.where(s != 0, s, 1)[..., None]
        q = np.clip(np.round(xb / safe), -32, 31)
        return ((xb - q * s[..., None]) ** 2).sum(-1)

    a, b = big / -32, big / -31
    scale = np.where((big != 0) & (err(b) < err(a)), b, a)
    sbig = np.take_along_axis(scale, np.abs(scale).argmax(-1)[:, None], -1)
    inv = np.where(sbig != 0, -128 / np.where(sbig != 0, sbig, 1), 0)
    v = inv * scale
    sc = np.clip(np.copysign(np.ceil(np.abs(v)), v), -128, 127).astype(np.int8)
    d = np.where(inv != 0, 1 / np.where(inv != 0, inv, 1), 0).astype(np.float16)[:, 0]
    step = d.astype(np.float32)[:, None] * sc
    safe = np.where(step != 0, step, 1)[..., None]
    q = (np.where(step[..., None] != 0, np.clip(np.round(xb / safe), -32, 31), 0) + 32).astype(np.uint8)
    q4 = q.reshape(n, 2, 4, 32)  # [super-block, half, group g, l]: value 128 half + 32 g + l
    ql = np.concatenate([(q4[:, :, 0] & 15) | ((q4[:, :, 2] & 15) << 4),
                         (q4[:, :, 1] & 15) | ((q4[:, :, 3] & 15) << 4)], axis=2)
    qh = (q4[:, :, 0] >> 4) | ((q4[:, :, 1] >> 4) << 2) | ((q4[:, :, 2] >> 4) << 4) | ((q4[:, :, 3] >> 4) << 6)
    out = np.concatenate([ql.reshape(n, 128), qh.reshape(n, 64), sc.view(np.uint8),
                          d.view(np.uint8).reshape(n, 2)], axis=1)
    return out.reshape(x.shape[0], -1)


def q4_k_m_type(gname, n_layer):
    """The format llama-quantize gives tensor `gname` in a Q4_K_M file, before the fallback."""
    def use_more_bits(i):
        return i < n_layer // 8 or i >= 7 * n_layer // 8 or (i - n_layer // 8) % 3 == 2
    if gname in ("token_embd.weight", "output.weight"):
        return "Q6_K"
    if gname.endswith(("attn_v.weight", "ffn_down.weight")):
        return "Q6_K" if use_more_bits(int(gname.split(".")[1])) else "Q4_K"
    return "Q4_K"


def quantize_as(arr, name):
    """(bytes, ggml type) of `arr` in format `name`, with llama.cpp's fallback for rows that are
    not whole super-blocks."""
    if name in ("Q4_K", "Q6_K") and arr.shape[-1] % 256:
        name = {"Q4_K": "Q5_0", "Q6_K": "Q8_0"}[name]
    qtype = getattr(gguf.GGMLQuantizationType, name)
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if name == "Q4_K":
        return quant_q4_k(arr), qtype
    if name == "Q6_K":
        return quant_q6_k(arr), qtype
    # BF16 is exact: the values are bf16 already
    return gguf.quants.quantize(arr, qtype), qtype


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(ROOT / "models" / "SmolLM2-135M-Instruct"))
    ap.add_argument("--source-gguf", default=str(ROOT / "models" / ".cache" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--type", default="BF16", choices=sorted(FILE_TYPES))
    ap.add_argument("--out", default=None, help="default: models/.cache/SmolLM2-135M-Instruct.TYPE.gguf")
    args = ap.parse_args()
    args.out = args.out or str(ROOT / "models" / ".cache" / f"SmolLM2-135M-Instruct.{args.type}.gguf")
    model = Path(args.model)
    cfg = json.loads((model / "config.json").read_text())
    out = Path(args.out)
    if out.exists():
        print(out)
        return
    src = gguf.GGUFReader(args.source_gguf)
    # A part name of our own: two writers of the same file (parallel tests) never share one.
    part = Path(f"{out}.{os.getpid()}.part")
    w = gguf.GGUFWriter(str(part), "llama")
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    w.add_name(f"SmolLM2-135M-Instruct ({args.type} from the prepared model)")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(nh)
    w.add_head_count_kv(nkv)
    w.add_rope_dimension_count(cfg["hidden_size"] // nh)
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    w.add_file_type(getattr(gguf.LlamaFileType, FILE_TYPES[args.type]))
    # tokenizer, copied field by field
    f = lambda key: src.fields[key].contents()  # noqa: E731
    w.add_tokenizer_model(f("tokenizer.ggml.model"))
    w.add_tokenizer_pre(f("tokenizer.ggml.pre"))
    w.add_token_list(f("tokenizer.ggml.tokens"))
    w.add_token_types(f("tokenizer.ggml.token_type"))
    w.add_token_merges(f("tokenizer.ggml.merges"))
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    w.add_add_bos_token(False)
    w.add_chat_template(f("tokenizer.chat_template"))

    tensors = load_safetensors(model / "model.safetensors")  # float32 views of the bf16 values
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    per_layer = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
                 "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down"}
    for name, arr in tensors.items():
        if name in names:
            gname = names[name]
        else:
            parts = name.split(".")
            gname = f"blk.{parts[2]}.{per_layer['.'.join(parts[3:-1])]}.weight"
        if gname.endswith("attn_q.weight"):
            arr = permute(arr, nh)
        elif gname.endswith("attn_k.weight"):
            arr = permute(arr, nkv)
        if arr.ndim == 1:
            w.add_tensor(gname, np.ascontiguousarray(arr, dtype=np.float32))
        else:
            ty = q4_k_m_type(gname, cfg["num_hidden_layers"]) if args.type == "Q4_K_M" else args.type
            data, qtype = quantize_as(arr, ty)
            w.add_tensor(gname, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    part.rename(out)
    print(out)


if __name__ == "__main__":
    main()
