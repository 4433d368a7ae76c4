"""ExpertParallel on gloo, 2 and 4 processes on 127.0.0.1: both modes equal the
single-process layer, run to run bit-identical, uneven splits, idle ranks."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import random_moe, tiny_config

import dots_moe
from dots_moe.distributed import ExpertParallel, expert_bounds

TOKENS_PER_RANK = [5, 0, 9, 300]  # all_to_all: each rank its own tokens (one rank none)


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def close(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item() <= 1e-5


def cases(world):
    """(name, bounds) per world size; None: the default even split."""
    unchosen = [0, 12, 16] if world == 2 else [0, 4, 8, 12, 16]
    uneven = [0, 3, 16] if world == 2 else [0, 1, 1, 9, 16]
    return [
        ("even", None),
        ("uneven", uneven),  # uneven sizes; with 4 ranks one holds no expert at all
        ("unchosen", unchosen),  # the last rank's experts are never chosen
    ]


def worker(rank, world, port):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        for dtype in (torch.float32, torch.bfloat16):
            for name, bounds in cases(world):
                cfg = tiny_config(n_group=4, topk_group=2)
                module = random_moe(cfg, seed=11, dtype=dtype)
                if name == "unchosen":
                    with torch.no_grad():
                        module.gate.e_score_correction_bias[12:] = -10.0
                single = dots_moe.MoeLayer.from_transformers(module)
                precision = dict(precision="f32")

                # all_reduce: every rank the same tokens.
                torch.manual_seed(1234)
                x = torch.randn(2, 7, cfg.hidden_size).to(dtype)
                want = single.forward_f32(x)
                for fixed in (False, True):
                    ep = ExpertParallel(module, mode="all_reduce", bounds=bounds, fixed_order=fixed, **precision)
                    if bounds is None:
                        assert ep.bounds == expert_bounds(16, world)
                    got = ep(x)
                    assert got.shape == x.shape and got.dtype == dtype
                    got32 = ep.experts.forward_f32(x)  # this rank's partial, for the idle-rank check
                    out = ep(x).float().reshape(-1, cfg.hidden_size)
                    assert torch.equal(got, ep(x)), "run to run"
                    if dtype == torch.float32:
                        assert close(out, want), f"all_reduce {name} fixed={fixed}"
                    else:
                        assert ((out - want).norm() / want.norm()).item() < 1e-2  # the bf16 output rounding
                    if name == "unchosen" and rank == world - 1:
                        assert not got32.any(), "a rank whose experts nobody chose contributes zeros"
                    if fixed:
                        everyone = [torch.empty_like(out) for _ in range(world)]
                        dist.all_gather(everyone, out)
                        assert all(torch.equal(e, out) for e in everyone), "same bits on every rank"

                # all_to_all: each rank its own tokens.
                torch.manual_seed(99 + rank)
                mine = torch.randn(TOKENS_PER_RANK[rank % len(TOKENS_PER_RANK)], cfg.hidden_size).to(dtype)
                ep = ExpertParallel(module, mode="all_to_all", bounds=bounds, **precision)
                got = ep(mine)
                assert got.shape == mine.shape and got.dtype == dtype
                assert torch.equal(got, ep(mine)), "run to run"
                if mine.shape[0]:
                    want = single.forward_f32(mine)
                    if dtype == torch.float32:
                        assert close(got, want), f"all_to_all {name}"
                    else:
                        assert ((got.float() - want).norm() / want.norm()).item() < 1e-2
                if name == "unchosen" and rank == world - 1:
                    assert ep.last_rows_received == 0, "no token goes to a rank whose experts nobody chose"
                elif name == "even" and sum(TOKENS_PER_RANK[:world]) > 0:
                    rows = torch.tensor([ep.last_rows_received])
                    dist.all_reduce(rows)
                    assert rows.item() > 0
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_expert_parallel_on_gloo(world):
    mp.spawn(worker, args=(world, free_port()), nprocs=world, join=True)


def test_bounds_are_contiguous_and_as_equal_as_possible():
    assert expert_bounds(16, 4) == [0, 4, 8, 12, 16]
    assert expert_bounds(10, 4) == [0, 3, 6, 8, 10]
    assert expert_bounds(2, 4) == [0, 1, 2, 2, 2]
    with pytest.raises(RuntimeError, match="init_process_group"):
        ExpertParallel(random_moe(tiny_config()), mode="all_reduce")
    with pytest.raises(ValueError, match="mode"):
        ExpertParallel(random_moe(tiny_config()), mode="ring")
