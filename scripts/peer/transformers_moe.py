#!/usr/bin/env python3
"""Times the transformers `Dots1MoE` module at real dots.llm1 shapes on the CPU: the peer
that `dots-moe bench` is compared with, run side by side on the same machine.

    .venv-golden/bin/python scripts/peer/transformers_moe.py --tokens 1,16,128,512 --threads 2

Weights are random (seeded), bf16 by default (`--dtype float32` for the f32 path); the
inputs are uniform random, so routing is close to uniform, as in `dots-moe bench`.
Prints one JSON object per batch size: tokens, median_us, dtype, threads.
"""
import argparse
import json
import statistics
import time

import torch
from transformers import Dots1Config
from transformers.models.dots1.modeling_dots1 import Dots1MoE


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", default="1,16,128,512")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--seconds", type=float, default=4.0)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(1)
    dtype = getattr(torch, args.dtype)
    config = Dots1Config(
        hidden_size=4096, intermediate_size=10944, moe_intermediate_size=1408, n_routed_experts=128,
        num_experts_per_tok=6, n_shared_experts=2, routed_scaling_factor=2.5, norm_topk_prob=True,
        n_group=1, topk_group=1, num_hidden_layers=2, first_k_dense_replace=1,
    )
    with torch.device("cpu"):
        moe = Dots1MoE(config)
    with torch.no_grad():
        for p in moe.parameters():
            bound = (3.0 / p.shape[-1]) ** 0.5
            p.uniform_(-bound, bound)
        moe.gate.e_score_correction_bias.uniform_(-0.02, 0.02)
    moe = moe.to(dtype).eval()
    moe.gate.e_score_correction_bias = moe.gate.e_score_correction_bias.float()

    for tokens in [int(t) for t in args.tokens.split(",")]:
        x = (torch.rand(1, tokens, 4096) * 2 - 1).mul(3 ** 0.5).to(dtype)
        times = []
        with torch.no_grad():
            moe(x)
            start = time.perf_counter()
            while len(times) < 3 or (len(times) < 50 and time.perf_counter() - start < args.seconds):
                t0 = time.perf_counter()
                moe(x)
                times.append(time.perf_counter() - t0)
        print(json.dumps({"peer": "transformers Dots1MoE", "tokens": tokens, "dtype": args.dtype,
                          "threads": args.threads, "median_us": statistics.median(times) * 1e6}), flush=True)


if __name__ == "__main__":
    main()
