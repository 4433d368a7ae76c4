"""Bytes moved and time of dots_moe.distributed.ExpertParallel on loopback gloo, beside the
single-process layer. Writes a markdown table (reports/distributed.md quotes it).

    .venv-py/bin/python scripts/python/bench_distributed.py --world 2 4 --tokens 64

Shape: dots.llm1's H 4096, E 128, top-6, 2 shared experts, bf16; the expert width I is cut
(--inter, 128 by default) so that every process can hold a transformers Dots1MoE: the
bytes moved do not depend on I, the compute time does.
"""

import argparse
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import Dots1Config
from transformers.models.dots1.modeling_dots1 import Dots1MoE

import dots_moe
from dots_moe.distributed import ExpertParallel


def module(inter):
    cfg = Dots1Config(
        hidden_size=4096, moe_intermediate_size=inter, n_routed_experts=128, num_experts_per_tok=6,
        n_shared_experts=2, routed_scaling_factor=2.5, norm_topk_prob=True, n_group=1, topk_group=1,
    )
    torch.manual_seed(0)
    m = Dots1MoE(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.02)
        m.gate.e_score_correction_bias.uniform_(-0.01, 0.01)
    return m.to(torch.bfloat16).eval()


def timed(f, reps):
    f()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def worker(rank, world, port, tokens, inter, reps, queue):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    m = module(inter)
    torch.manual_seed(1 + rank)
    x = torch.randn(tokens, 4096).to(torch.bfloat16)
    row = {}
    if rank == 0:
        single = dots_moe.MoeLayer.from_transformers(m)
        row["single_ms"] = 1e3 * timed(lambda: single(x), reps)
    dist.barrier()
    for mode in ("all_reduce", "all_to_all"):
        ep = ExpertParallel(m, mode=mode)
        dist.barrier()
        t = timed(lambda: ep(x), reps)
        sent = torch.tensor([float(ep.last_bytes_sent)])
        dist.all_reduce(sent)
        row[f"{mode}_ms"] = 1e3 * t
        # Bytes per token: all_reduce: every rank holds the same `tokens`; all_to_all: each
        # rank its own `tokens`, so world * tokens tokens in all.
        held = tokens if mode == "all_reduce" else tokens * world
        row[f"{mode}_bytes_per_token"] = sent.item() / held
    if rank == 0:
        queue.put(row)
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--world", type=int, nargs="+", default=[2, 4])
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--inter", type=int, default=128)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    ctx = mp.get_context("spawn")
    print(f"| ranks | tokens/rank | single-process ms | all_reduce ms | all_reduce bytes/token (all ranks) "
          f"| all_to_all ms | all_to_all bytes/token (all ranks) |")
    print("|---|---|---|---|---|---|---|")
    for world in args.world:
        queue = ctx.SimpleQueue()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(worker, args=(world, port, args.tokens, args.inter, args.reps, queue), nprocs=world, join=True)
        r = queue.get()
        print(f"| {world} | {args.tokens} | {r['single_ms']:.1f} | {r['all_reduce_ms']:.1f} | "
              f"{r['all_reduce_bytes_per_token']:.0f} | {r['all_to_all_ms']:.1f} | {r['all_to_all_bytes_per_token']:.0f} |")


if __name__ == "__main__":
    main()
