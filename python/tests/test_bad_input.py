"""Bad input is a ValueError or TypeError naming the argument, its shape and dtype."""

import pytest
import torch
from conftest import random_moe, tiny_config

import dots_moe


@pytest.fixture(scope="module")
def layer():
    return dots_moe.MoeLayer.from_transformers(random_moe(tiny_config()))


def test_wrong_dtype(layer):
    with pytest.raises(TypeError, match=r"hidden_states: expected .*shape \(3, 64\), dtype torch.float16"):
        layer(torch.randn(3, 64, dtype=torch.float16))
    with pytest.raises(TypeError, match=r"gating_output: .*dtype torch.float64"):
        dots_moe.grouped_topk(None, torch.randn(3, 8, dtype=torch.float64), 2, True)
    with pytest.raises(TypeError, match="topk_ids"):
        dots_moe.fused_experts(torch.randn(2, 8), torch.randn(4, 8, 8), torch.randn(4, 8, 4),
                               torch.ones(2, 1), torch.zeros(2, 1, dtype=torch.float32))
    with pytest.raises(TypeError, match="hidden_states: expected a torch.Tensor, got list"):
        layer.forward_f32([[0.0] * 64])


def test_wrong_shape(layer):
    with pytest.raises(ValueError, match=r"hidden_states: expected shape \[T, 64\] .*got shape \(3, 63\)"):
        layer(torch.randn(3, 63))
    with pytest.raises(ValueError, match=r"w2: expected shape \[4, 8, 4\], got shape \(4, 8, 5\)"):
        dots_moe.fused_experts(torch.randn(2, 8), torch.randn(4, 8, 8), torch.randn(4, 8, 5),
                               torch.ones(2, 1), torch.zeros(2, 1, dtype=torch.int32))
    with pytest.raises(ValueError, match="e_score_correction_bias"):
        dots_moe.grouped_topk(None, torch.randn(3, 8), 2, True, e_score_correction_bias=torch.zeros(7))


def test_wrong_device(layer):
    meta = torch.empty(3, 64, device="meta")
    with pytest.raises(ValueError, match=r"hidden_states: dots_moe runs on the CPU.*device meta"):
        layer(meta)


def test_non_contiguous(layer):
    x = torch.randn(64, 3).t()
    with pytest.raises(ValueError, match=r"hidden_states: not contiguous .*shape \(3, 64\)"):
        layer(x)
    with pytest.raises(ValueError, match="w1: not contiguous"):
        dots_moe.fused_experts(torch.randn(2, 8), torch.randn(4, 8, 8).transpose(1, 2), torch.randn(4, 8, 4),
                               torch.ones(2, 1), torch.zeros(2, 1, dtype=torch.int32))


def test_top_k_above_e(layer):
    with pytest.raises(ValueError, match=r"topk: must be in 1..8"):
        dots_moe.grouped_topk(None, torch.randn(3, 8), 9, True)
    with pytest.raises(ValueError, match=r"top_k = 5 is not in 1..4"):
        dots_moe.fused_experts(torch.randn(2, 8), torch.randn(4, 8, 8), torch.randn(4, 8, 4),
                               torch.ones(2, 5), torch.zeros(2, 5, dtype=torch.int32))
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        dots_moe.MoeLayer.from_transformers(random_moe(tiny_config(num_experts_per_tok=17)))


def test_bad_values_are_errors_not_crashes(layer):
    with pytest.raises(ValueError, match="not finite"):
        layer(torch.full((2, 64), float("nan")))
    with pytest.raises(ValueError, match="out of range"):
        dots_moe.fused_experts(torch.randn(2, 8), torch.randn(4, 8, 8), torch.randn(4, 8, 4),
                               torch.ones(2, 1), torch.full((2, 1), 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="negative expert id"):
        dots_moe.fused_experts(torch.randn(2, 8), torch.randn(4, 8, 8), torch.randn(4, 8, 4),
                               torch.ones(2, 1), torch.full((2, 1), -1, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"local_experts: range\(3, 17\)"):
        dots_moe.MoeLayer.from_transformers(random_moe(tiny_config()), local_experts=range(3, 17))
    with pytest.raises(ValueError, match="activation"):
        dots_moe.fused_experts(torch.randn(2, 8), torch.randn(4, 8, 8), torch.randn(4, 8, 4),
                               torch.ones(2, 1), torch.zeros(2, 1, dtype=torch.int32), activation="gelu")
