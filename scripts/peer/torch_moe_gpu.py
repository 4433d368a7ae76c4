#!/usr/bin/env python3
"""The PyTorch peer of the CUDA MoE layer, for the GPU host, run side by side with
`cargo bench --bench cuda_moe` in the same session: one dots.llm1 MoE layer (H 4096,
I 1408, E 128, top-6 sigmoid-with-bias routing scaled by 2.5, 2 shared experts as one
2816-wide MLP), bf16 weights in the contract's layout (gate_up [E, 2I, H], down [E, H, I]),
seeded uniform weights and inputs (the same shapes and distributions as the Rust bench; not
the same random numbers), timed with CUDA events, median of many runs.

Paths:
  loop     the transformers-style per-expert loop (torch.where per expert, index_add_),
  grouped  torch._grouped_mm when this PyTorch has it (rows padded to 16 per expert, as
           torchtitan does), with the same routing; skipped with the reason otherwise.

    python3 scripts/peer/torch_moe_gpu.py --tokens 1,16,64,256,1024,4096,16384

Prints one JSON object per (path, tokens), then a table with the floor of docs/perf.md
(4.3 TB/s, 790 TFLOP/s) and floor / time. Needs only torch and a CUDA device.
"""
import argparse
import json
import statistics

import torch
import torch.nn.functional as F

H, I, E, K, S_WIDTH, SCALE = 4096, 1408, 128, 6, 2816, 2.5
HBM_BYTES_PER_S, PEAK_FLOPS = 4.3e12, 790e12


def uniform(shape, fan_in, gen, dtype=torch.bfloat16):
    bound = (3.0 / fan_in) ** 0.5
    return (torch.rand(shape, generator=gen, device="cuda") * 2 - 1).mul_(bound).to(dtype)


def make_layer(seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return {
        "router": uniform((E, H), H, gen),
        "bias": (torch.rand(E, generator=gen, device="cuda") * 0.04 - 0.02).float(),
        "gate_up": uniform((E, 2 * I, H), H, gen),
        "down": uniform((E, H, I), I, gen),
        "shared_gate_up": uniform((2 * S_WIDTH, H), H, gen),
        "shared_down": uniform((H, S_WIDTH), S_WIDTH, gen),
    }


def route(layer, x):
    logits = x.float() @ layer["router"].float().t()
    scores = logits.sigmoid()
    ids = torch.topk(scores + layer["bias"], K, dim=-1, sorted=True).indices
    w = scores.gather(1, ids)
    w = w / (w.sum(-1, keepdim=True) + 1e-20) * SCALE
    return ids, w


def shared_mlp(layer, x):
    gu = x @ layer["shared_gate_up"].t()
    return (F.silu(gu[:, :S_WIDTH]) * gu[:, S_WIDTH:]) @ layer["shared_down"].t()


def moe_loop(layer, x):
    ids, w = route(layer, x)
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in ids.unique().tolist():
        token, slot = torch.where(ids == e)
        h = x[token]
        gu = h @ layer["gate_up"][e].t()
        y = (F.silu(gu[:, :I]) * gu[:, I:]) @ layer["down"][e].t()
        out.index_add_(0, token, y.float() * w[token, slot, None])
    return out + shared_mlp(layer, x).float()


def moe_grouped(layer, x):
    t = x.shape[0]
    ids, w = route(layer, x)
    flat = ids.flatten()
    counts = torch.bincount(flat, minlength=E)
    padded = (counts + 15) // 16 * 16
    pad_start = torch.cumsum(padded, 0) - padded
    order = torch.argsort(flat, stable=True)
    sorted_ids = flat[order]
    start = torch.cumsum(counts, 0) - counts
    rank = torch.arange(t * K, device=x.device) - start[sorted_ids]
    position = torch.empty_like(order)
    position[order] = pad_start[sorted_ids] + rank
    rows = t * K + 16 * E  # a static bound: no host sync
    x_pad = torch.zeros((rows, H), dtype=x.dtype, device=x.device)
    x_pad[position] = x[torch.arange(t * K, device=x.device) // K]
    offs = torch.cumsum(padded, 0).to(torch.int32)
    gu = torch._grouped_mm(x_pad, layer["gate_up"].transpose(-2, -1), offs=offs)
    act = F.silu(gu[:, :I]) * gu[:, I:]
    y = torch._grouped_mm(act, layer["down"].transpose(-2, -1), offs=offs)
    routed = (y[position].float() * w.flatten()[:, None]).view(t, K, H).sum(1)
    return routed + shared_mlp(layer, x).float()


def time_ms(fn, x, reps):
    fn(x)
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(x)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def floor_us(layer, x):
    ids, _ = route(layer, x)
    distinct = ids.unique().numel()
    t = x.shape[0]
    slot_bytes = 3 * H * I * 2
    weight_bytes = (distinct + 2) * slot_bytes + E * H * 2 + E * 4
    bytes_ = weight_bytes + 2 * t * H * 4
    flops = 2 * t * E * H + t * (K + 2) * 6 * I * H
    return max(bytes_ / HBM_BYTES_PER_S, flops / PEAK_FLOPS) * 1e6, bytes_, flops


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", default="1,16,64,256,1024,4096,16384")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = True
    layer = make_layer(args.seed)
    paths = {"loop": moe_loop}
    grouped_error = None
    if hasattr(torch, "_grouped_mm"):
        paths["grouped"] = moe_grouped
    else:
        grouped_error = f"torch {torch.__version__} has no torch._grouped_mm"
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}", flush=True)
    rows = []
    gen = torch.Generator(device="cuda").manual_seed(args.seed + 1)
    for tokens in [int(t) for t in args.tokens.split(",")]:
        x = ((torch.rand((tokens, H), generator=gen, device="cuda") * 2 - 1) * 3 ** 0.5).to(torch.bfloat16)
        floor, bytes_, flops = floor_us(layer, x)
        with torch.no_grad():
            reference = None
            for name, fn in paths.items():
                try:
                    out = fn(layer, x)
                    if reference is None:
                        reference = out
                    agreement = ((out - reference).norm() / reference.norm()).item()
                    ms = time_ms(lambda v: fn(layer, v), x, args.reps if tokens <= 4096 else max(5, args.reps // 3))
                except Exception as err:  # noqa: BLE001 - report and go on with the other path
                    grouped_error = f"{name}: {type(err).__name__}: {err}"
                    print(json.dumps({"peer": f"torch {name}", "tokens": tokens, "error": grouped_error}), flush=True)
                    continue
                us = ms * 1e3
                row = {"peer": f"torch {name}", "tokens": tokens, "median_us": us, "gb_per_s": bytes_ / us / 1e3,
                       "tflop_per_s": flops / us / 1e6, "floor_us": floor, "floor_ratio": floor / us,
                       "rel_diff_vs_loop": agreement}
                rows.append(row)
                print(json.dumps(row), flush=True)
    if grouped_error:
        print(f"# grouped path: {grouped_error}")
    print(f"{'peer':>14} {'T':>6} {'median us':>11} {'GB/s':>8} {'TFLOP/s':>8} {'floor us':>9} {'floor/time':>10}")
    for r in rows:
        print(f"{r['peer']:>14} {r['tokens']:>6} {r['median_us']:>11.1f} {r['gb_per_s']:>8.0f} "
              f"{r['tflop_per_s']:>8.1f} {r['floor_us']:>9.1f} {r['floor_ratio']:>10.2f}")


if __name__ == "__main__":
    main()
