#!/usr/bin/env python3
"""Writes a GGUF of the prepared model: BF16 (for llama.cpp, the peer in benches/vs_llamacpp.py),
or quantized to Q8_0, Q4_0 or Q4_1 by gguf-py's quantizers (test files of the formats the
shipped Q4_1 file does not use, and the reference bytes `--quantization` must reproduce;
tests/gguf.rs). Q4_1 needs --out: its default name is the shipped file's.

The tensors are the prepared model's bf16 weights (bit for bit in BF16), with llama.cpp's q/k row
permutation re-applied (its LLAMA graph rotates adjacent pairs); norms are F32 as llama.cpp's
own converter writes them. Tokenizer and chat-template metadata are copied from the GGUF the
model was prepared from, with eos fixed to <|im_end|> (2) as in the prepared model.

  .venv/bin/python scripts/make_gguf.py [--type BF16|F16|Q8_0|Q4_0|Q4_1] [--model DIR] [--out FILE]
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
FILE_TYPES = {"BF16": "MOSTLY_BF16", "F16": "MOSTLY_F16", "Q8_0": "MOSTLY_Q8_0", "Q4_0": "MOSTLY_Q4_0",
              "Q4_1": "MOSTLY_Q4_1"}

import gguf  # noqa: E402
from reference import load_safetensors  # noqa: E402


def permute(w, n_head):
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows (inverse of prepare_model's)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(ROOT / "models" / "SmolLM2-135M-Instruct"))
    ap.add_argument("--source-gguf", default=str(ROOT / "models" / ".cache" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--type", default="BF16", choices=sorted(FILE_TYPES))
    ap.add_argument("--out", default=None, help="default: models/.cache/SmolLM2-135M-Instruct.TYPE.gguf")
    args = ap.parse_args()
    args.out = args.out or str(ROOT / "models" / ".cache" / f"SmolLM2-135M-Instruct.{args.type}.gguf")
    qtype = getattr(gguf.GGMLQuantizationType, args.type)
    model = Path(args.model)
    cfg = json.loads((model / "config.json").read_text())
    out = Path(args.out)
    if out.exists():
        print(out)
        return
    src = gguf.GGUFReader(args.source_gguf)
    w = gguf.GGUFWriter(str(out) + ".part", "llama")
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
            # BF16 is exact: the values are bf16 already
            data = gguf.quants.quantize(np.ascontiguousarray(arr, dtype=np.float32), qtype)
            w.add_tensor(gname, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    Path(str(out) + ".part").rename(out)
    print(out)


if __name__ == "__main__":
    main()
