"""The vLLM-style functional ops: grouped_topk and fused_experts."""

import pytest
import torch
import torch.nn.functional as F
from conftest import random_moe, tiny_config

import dots_moe


def torch_fused_experts(x, w1, w2, topk_weights, topk_ids):
    """The plain definition: sum_j w_j * down(silu(gate x) * up x), in f32."""
    i = w1.shape[1] // 2
    out = torch.zeros(x.shape[0], w2.shape[1])
    xf = x.float()
    for t in range(x.shape[0]):
        for j in range(topk_ids.shape[1]):
            e = int(topk_ids[t, j])
            g = w1[e, :i].float() @ xf[t]
            u = w1[e, i:].float() @ xf[t]
            out[t] += topk_weights[t, j].float() * (w2[e].float() @ (F.silu(g) * u))
    return out


@pytest.mark.parametrize("groups", [(1, 1), (4, 2), (8, 3)])
@pytest.mark.parametrize("tokens", [1, 7, 300])
def test_grouped_topk_is_the_dots1_router(groups, tokens):
    cfg = tiny_config(n_group=groups[0], topk_group=groups[1])
    module = random_moe(cfg, seed=tokens + groups[0])
    x = torch.randn(tokens, cfg.hidden_size)
    logits = F.linear(x, module.gate.weight)
    weights, ids = dots_moe.grouped_topk(
        x, logits, cfg.num_experts_per_tok, True, num_expert_group=groups[0], topk_group=groups[1],
        scoring_func="sigmoid", routed_scaling_factor=cfg.routed_scaling_factor,
        e_score_correction_bias=module.gate.e_score_correction_bias,
    )
    assert ids.dtype == torch.int32 and weights.dtype == torch.float32
    assert ids.shape == weights.shape == (tokens, cfg.num_experts_per_tok)
    t_ids, t_weights = module.gate(x)
    t_ids, order = t_ids.sort(dim=-1)
    mine = ids.long().argsort(dim=-1)
    assert torch.equal(ids.long().gather(1, mine), t_ids)
    assert torch.allclose(weights.gather(1, mine), t_weights.gather(1, order), rtol=1e-6, atol=0)
    # Descending choice order within each token.
    choice = torch.sigmoid(logits) + module.gate.e_score_correction_bias
    chosen = choice.gather(1, ids.long())
    assert bool((chosen[:, :-1] >= chosen[:, 1:]).all())


def test_grouped_topk_softmax_and_no_renormalize():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    weights, ids = dots_moe.grouped_topk(logits, logits, 2, False, scoring_func="softmax")
    probs = torch.softmax(logits, dim=-1)
    assert ids.tolist() == [[1, 2]]
    assert torch.allclose(weights, probs[:, [1, 2]])
    weights, _ = dots_moe.grouped_topk(logits, logits.to(torch.bfloat16), 2, True, routed_scaling_factor=2.0)
    assert torch.allclose(weights.sum(), torch.tensor(2.0))


@pytest.mark.parametrize("tokens", [1, 7, 300])
def test_fused_experts_matches_the_definition(tokens):
    torch.manual_seed(tokens)
    e, h, i, k = 8, 32, 16, 3
    x = torch.randn(tokens, h)
    w1 = torch.randn(e, 2 * i, h) * 0.3
    w2 = torch.randn(e, h, i) * 0.3
    logits = torch.randn(tokens, e)
    weights, ids = dots_moe.grouped_topk(x, logits, k, True)
    got = dots_moe.fused_experts(x, w1, w2, weights, ids)
    want = torch_fused_experts(x, w1, w2, weights, ids)
    assert got.dtype == torch.float32
    assert ((got - want).norm() / want.norm()).item() <= 1e-5
    # int64 ids (what torch.topk returns) work too; bf16 runs with bf16 inputs.
    assert torch.equal(dots_moe.fused_experts(x, w1, w2, weights, ids.long()), got)
    got_bf16 = dots_moe.fused_experts(x.bfloat16(), w1.bfloat16(), w2.bfloat16(), weights, ids)
    assert got_bf16.dtype == torch.bfloat16
    want_bf16 = torch_fused_experts(x.bfloat16(), w1.bfloat16(), w2.bfloat16(), weights, ids)
    assert ((got_bf16.float() - want_bf16).norm() / want_bf16.norm()).item() <= 2e-2


def test_fused_experts_is_the_routed_part_of_dots1moe():
    cfg = tiny_config()
    module = random_moe(cfg, seed=3)
    x = torch.randn(9, cfg.hidden_size)
    w1 = torch.stack([torch.cat([m.gate_proj.weight, m.up_proj.weight]) for m in module.experts]).detach()
    w2 = torch.stack([m.down_proj.weight for m in module.experts]).detach()
    with torch.no_grad():
        ids, weights = module.gate(x)
        want = module.moe(x, ids, weights)
    got = dots_moe.fused_experts(x, w1, w2, weights, ids)
    assert ((got - want).norm() / want.norm()).item() <= 1e-5
