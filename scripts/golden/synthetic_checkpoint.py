#!/usr/bin/env python3
"""Writes a synthetic dots.llm1 checkpoint of real width for timing (reports/model.md).

Every shape is the real model's (hidden 4096, 32 heads of 128, dense MLP 10944, 128
routed experts of 1408 plus 2 shared, vocab 152064), only the layer count is small:
`--layers 3 --dense 1` gives one dense layer and two MoE layers (about 12 GB of bf16).
Sharded like a real checkpoint: one file per decoder layer plus one for the embeddings,
final norm and lm_head, with model.safetensors.index.json.

Values: bf16, normal with std 1/sqrt(fan_in) (embeddings std 1, norms near 1, a small
random correction bias), tiled from a few random blocks so writing is I/O-bound. The
weights are random, so the text is gibberish; only the speed and memory are meaningful.

Needs numpy only.  Usage:
    python scripts/golden/synthetic_checkpoint.py OUT_DIR [--layers 3] [--dense 1]
"""

import argparse
import json
import struct
from pathlib import Path

import numpy as np

H, HEADS, KV, D = 4096, 32, 32, 128
DENSE_I, MOE_I, E, TOP_K, SHARED = 10944, 1408, 128, 6, 2
VOCAB = 152064
BLOCK = 1 << 24  # elements per random block


def bf16_bits(x):
    """float32 array -> bf16 bit patterns (round to nearest even)."""
    u = x.astype(np.float32).view(np.uint32)
    rounded = u + 0x7FFF + ((u >> 16) & 1)
    return (rounded >> 16).astype(np.uint16)


class Blocks:
    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)
        self.cache = {}

    def block(self, std):
        if std not in self.cache:
            self.cache[std] = bf16_bits(self.rng.standard_normal(BLOCK, dtype=np.float32) * std)
        return self.cache[std]

    def fill(self, f, n, std):
        """Writes n bf16 values drawn from the block of `std`, starting at a random offset."""
        block = self.block(std)
        start = int(self.rng.integers(0, BLOCK))
        while n > 0:
            take = min(n, BLOCK - start)
            f.write(block[start:start + take].tobytes())
            n -= take
            start = 0


def write_file(path, tensors, blocks):
    """tensors: list of (name, shape, kind) where kind is ('normal', std) or ('values', f32 array)."""
    header, offset = {}, 0
    for name, shape, kind in tensors:
        dtype = "F32" if kind[0] == "f32" else "BF16"
        size = int(np.prod(shape)) * (4 if dtype == "F32" else 2)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for name, shape, kind in tensors:
            n = int(np.prod(shape))
            if kind[0] == "normal":
                blocks.fill(f, n, kind[1])
            elif kind[0] == "values":
                f.write(bf16_bits(kind[1]).tobytes())
            else:
                f.write(kind[1].astype(np.float32).tobytes())
    return offset


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--dense", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed + 1)
    blocks = Blocks(args.seed)
    norm = lambda n: ("values", (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32))  # noqa: E731
    files, weight_map, total = [], {}, 0
    nfiles = args.layers + 1

    def shard(i):
        return f"model-{i + 1:05d}-of-{nfiles:05d}.safetensors"

    for n in range(args.layers):
        p = f"model.layers.{n}"
        t = [
            (f"{p}.input_layernorm.weight", [H], norm(H)),
            (f"{p}.post_attention_layernorm.weight", [H], norm(H)),
            (f"{p}.self_attn.q_proj.weight", [HEADS * D, H], ("normal", H ** -0.5)),
            (f"{p}.self_attn.k_proj.weight", [KV * D, H], ("normal", H ** -0.5)),
            (f"{p}.self_attn.v_proj.weight", [KV * D, H], ("normal", H ** -0.5)),
            (f"{p}.self_attn.o_proj.weight", [H, HEADS * D], ("normal", (HEADS * D) ** -0.5)),
            (f"{p}.self_attn.q_norm.weight", [D], norm(D)),
            (f"{p}.self_attn.k_norm.weight", [D], norm(D)),
        ]
        if n < args.dense:
            t += [
                (f"{p}.mlp.gate_proj.weight", [DENSE_I, H], ("normal", H ** -0.5)),
                (f"{p}.mlp.up_proj.weight", [DENSE_I, H], ("normal", H ** -0.5)),
                (f"{p}.mlp.down_proj.weight", [H, DENSE_I], ("normal", DENSE_I ** -0.5)),
            ]
        else:
            t += [
                (f"{p}.mlp.gate.weight", [E, H], ("normal", H ** -0.5)),
                (f"{p}.mlp.gate.e_score_correction_bias", [E], ("f32", 0.05 * rng.standard_normal(E))),
            ]
            for e in range(E):
                q = f"{p}.mlp.experts.{e}"
                t += [
                    (f"{q}.gate_proj.weight", [MOE_I, H], ("normal", H ** -0.5)),
                    (f"{q}.up_proj.weight", [MOE_I, H], ("normal", H ** -0.5)),
                    (f"{q}.down_proj.weight", [H, MOE_I], ("normal", MOE_I ** -0.5)),
                ]
            s = SHARED * MOE_I
            t += [
                (f"{p}.mlp.shared_experts.gate_proj.weight", [s, H], ("normal", H ** -0.5)),
                (f"{p}.mlp.shared_experts.up_proj.weight", [s, H], ("normal", H ** -0.5)),
                (f"{p}.mlp.shared_experts.down_proj.weight", [H, s], ("normal", s ** -0.5)),
            ]
        files.append((shard(n), t))
    files.append((shard(args.layers), [
        ("model.embed_tokens.weight", [VOCAB, H], ("normal", 1.0)),
        ("model.norm.weight", [H], norm(H)),
        ("lm_head.weight", [VOCAB, H], ("normal", H ** -0.5)),
    ]))
    for name, tensors in files:
        total += write_file(out / name, tensors, blocks)
        for tensor_name, _, _ in tensors:
            weight_map[tensor_name] = name
        print(f"wrote {name}", flush=True)
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1) + "\n")
    config = {
        "architectures": ["Dots1ForCausalLM"], "model_type": "dots1",
        "hidden_size": H, "num_hidden_layers": args.layers, "num_attention_heads": HEADS,
        "num_key_value_heads": KV, "intermediate_size": DENSE_I, "moe_intermediate_size": MOE_I,
        "n_routed_experts": E, "num_experts_per_tok": TOP_K, "n_shared_experts": SHARED,
        "routed_scaling_factor": 2.5, "norm_topk_prob": True, "scoring_func": "noaux_tc",
        "first_k_dense_replace": args.dense, "rope_theta": 10000000, "rms_norm_eps": 1e-5,
        "vocab_size": VOCAB, "tie_word_embeddings": False, "max_position_embeddings": 32768,
        "eos_token_id": 151643, "torch_dtype": "bfloat16",
    }
    (out / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    print(f"{out}: {total / 1e9:.2f} GB in {len(files)} shards")


if __name__ == "__main__":
    main()
