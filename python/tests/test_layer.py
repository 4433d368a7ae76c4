"""MoeLayer against transformers' own Dots1MoE, and patch_transformers on a tiny model."""

import pytest
import torch
from conftest import random_moe, tiny_config
from transformers import Dots1ForCausalLM

import dots_moe


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("tokens", [1, 7, 300])
@pytest.mark.parametrize("groups", [(1, 1), (4, 2)])
def test_f32_matches_transformers(tokens, groups):
    cfg = tiny_config(n_group=groups[0], topk_group=groups[1])
    module = random_moe(cfg, seed=tokens)
    layer = dots_moe.MoeLayer.from_transformers(module)
    x = torch.randn(tokens, cfg.hidden_size)
    with torch.no_grad():
        want = module(x)
    got = layer(x)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert rel_err(got, want) <= 1e-4
    # The routing is transformers' own.
    ids, weights = layer.route(x)
    t_ids, t_weights = module.gate(x)
    t_ids, order = t_ids.sort(dim=-1)
    assert torch.equal(ids.long().sort(dim=-1).values, t_ids)
    assert torch.allclose(weights.gather(1, ids.long().argsort(dim=-1)), t_weights.gather(1, order), rtol=1e-6)


@pytest.mark.parametrize("tokens", [1, 7, 300])
def test_bf16_matches_transformers(tokens):
    cfg = tiny_config(n_group=4, topk_group=2)
    module = random_moe(cfg, seed=100 + tokens, dtype=torch.bfloat16)
    layer = dots_moe.MoeLayer.from_transformers(module)
    x = torch.randn(tokens, cfg.hidden_size).to(torch.bfloat16)
    with torch.no_grad():
        want = module(x)
    got = layer(x)
    assert got.dtype == torch.bfloat16
    # transformers rounds every intermediate to bf16; the layer only the GEMM inputs.
    assert rel_err(got, want) <= 2e-2


def test_batched_input_shape_and_partials_sum():
    cfg = tiny_config(n_group=4, topk_group=2)
    module = random_moe(cfg, seed=5)
    x = torch.randn(2, 5, cfg.hidden_size)
    with torch.no_grad():
        want = module(x)
    full = dots_moe.MoeLayer.from_transformers(module)
    assert full(x).shape == (2, 5, cfg.hidden_size)
    assert rel_err(full(x), want) <= 1e-4
    parts = [
        dots_moe.MoeLayer.from_transformers(module, local_experts=range(0, 5), shared_experts=False),
        dots_moe.MoeLayer.from_transformers(module, local_experts=range(5, 5), shared_experts=True),
        dots_moe.MoeLayer.from_transformers(module, local_experts=range(5, 16), shared_experts=False),
    ]
    total = sum(p(x) for p in parts)
    assert rel_err(total, want) <= 1e-4
    assert parts[1].local_experts == range(5, 5) and parts[1].has_shared_experts


def test_zero_copy_input():
    """The native layer reads the tensor's own memory: the address handed over is its own."""
    import numpy as np

    from dots_moe._tensors import host_view

    x = torch.randn(3, 64)
    assert host_view(x, "x") == ((x.data_ptr(), 192), "f32")
    xb = x.to(torch.bfloat16)
    assert host_view(xb, "x") == ((xb.data_ptr(), 192), "bf16")
    a = np.zeros((3, 64), dtype=np.float32)
    assert host_view(a, "x") == ((a.ctypes.data, 192), "f32")


def test_patched_model_generates_the_same_greedy_tokens():
    cfg = tiny_config(n_group=4, topk_group=2)
    torch.manual_seed(0)
    model = Dots1ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.3)
        for m in model.modules():
            if type(m).__name__ == "Dots1TopkRouter":
                m.e_score_correction_bias.uniform_(-0.05, 0.05)
    prompt = torch.tensor([[3, 17, 42, 5, 88, 1, 60]])
    with torch.no_grad():
        want = model.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
        logits_before = model(prompt).logits
    replaced = dots_moe.patch_transformers(model)
    assert replaced == cfg.num_hidden_layers - cfg.first_k_dense_replace
    assert sum(isinstance(m, dots_moe.MoeLayer) for m in model.modules()) == replaced
    with torch.no_grad():
        got = model.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
        logits_after = model(prompt).logits
    assert torch.equal(got, want), (got, want)
    assert rel_err(logits_after, logits_before) <= 1e-4
