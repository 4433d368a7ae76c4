"""dots_moe: the dots.llm1 Mixture-of-Experts layer for PyTorch, on the dots-moe CPU layer.

- `grouped_topk` and `fused_experts`: vLLM's fused-MoE functional ops, same signatures;
- `MoeLayer.from_transformers(module)`: a drop-in for transformers' `Dots1MoE`;
- `patch_transformers(model)`: swaps every `Dots1MoE` of a loaded model in place;
- `dots_moe.distributed.ExpertParallel`: expert parallelism on torch.distributed.

Tensors are CPU float32 or bfloat16, contiguous; they are read in place (no copy).
"""

import torch

from . import _native
from ._tensors import check_shape, describe, host_view, out_f32, raw

__all__ = ["MoeLayer", "fused_experts", "grouped_topk", "patch_transformers"]


def _tokens_hidden(x, name, hidden_size):
    """`x` as `[T, H]` (a view of `[T, H]` or `[batch, seq, H]`), checked."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() not in (2, 3) or x.shape[-1] != hidden_size:
        raise ValueError(f"{name}: expected shape [T, {hidden_size}] or [batch, seq, {hidden_size}], got {describe(x)}")
    host_view(x, name)  # device, dtype, contiguity, before any reshape
    return x.reshape(-1, hidden_size)


def grouped_topk(
    hidden_states,
    gating_output,
    topk,
    renormalize,
    num_expert_group=0,
    topk_group=0,
    scoring_func="sigmoid",
    routed_scaling_factor=1.0,
    e_score_correction_bias=None,
):
    """vLLM's `grouped_topk`: routes `gating_output [T, E]` (router logits).

    Scores are `sigmoid` (or `softmax`) of the logits; `e_score_correction_bias` only
    chooses the experts. With `num_expert_group > 1`, each group scores the sum of its two
    best choices and only the `topk_group` best groups stay eligible (the others' choices
    become 0.0, as transformers' Dots1 router does). The weights are the unbiased scores of
    the chosen, divided by their sum when `renormalize`, times `routed_scaling_factor`.
    Returns `(topk_weights float32 [T, topk], topk_ids int32 [T, topk])`, each token's
    choices in descending order, ties to the lower expert index.
    """
    if not isinstance(gating_output, torch.Tensor) or gating_output.dim() != 2:
        raise ValueError(f"gating_output: expected a [T, E] tensor, got {_what(gating_output)}")
    tokens, n_experts = gating_output.shape
    if isinstance(hidden_states, torch.Tensor) and hidden_states.shape[0] != tokens:
        raise ValueError(f"hidden_states: {describe(hidden_states)} has not the {tokens} tokens of gating_output")
    if not isinstance(topk, int) or not 1 <= topk <= n_experts:
        raise ValueError(f"topk: must be in 1..{n_experts} (the experts of gating_output), got {topk!r}")
    logits, code = host_view(gating_output, "gating_output")
    bias = None
    if e_score_correction_bias is not None:
        if not isinstance(e_score_correction_bias, torch.Tensor):
            raise TypeError(f"e_score_correction_bias: expected a torch.Tensor, got {type(e_score_correction_bias).__name__}")
        check_shape(e_score_correction_bias, "e_score_correction_bias", [n_experts])
        host_view(e_score_correction_bias, "e_score_correction_bias")
        bias_f32 = e_score_correction_bias.detach().float().contiguous()  # alive for the call
        bias, _ = host_view(bias_f32, "e_score_correction_bias")
    n_group = num_expert_group if num_expert_group and num_expert_group > 0 else 1
    kept = topk_group if topk_group and topk_group > 0 else n_group
    weights = torch.empty((tokens, topk), dtype=torch.float32)
    ids = torch.empty((tokens, topk), dtype=torch.int32)
    _native.grouped_topk(
        logits, code, tokens, n_experts, topk, bool(renormalize), n_group, kept, scoring_func,
        float(routed_scaling_factor), bias, raw(ids), raw(weights),
    )
    return weights, ids


def _what(x):
    return describe(x) if isinstance(x, torch.Tensor) else type(x).__name__


def _routing(topk_weights, topk_ids, tokens):
    """The routing tensors as contiguous float32 / int32 `[T, k]` (converted if needed)."""
    for name, t in (("topk_weights", topk_weights), ("topk_ids", topk_ids)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[0] != tokens:
            raise ValueError(f"{name}: expected a [{tokens}, k] tensor, got {_what(t)}")
        if t.device.type != "cpu":
            raise ValueError(f"{name}: dots_moe runs on the CPU; got a tensor with {describe(t)}")
    if topk_weights.shape != topk_ids.shape:
        raise ValueError(f"topk_weights {describe(topk_weights)} and topk_ids {describe(topk_ids)} differ in shape")
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"topk_ids: expected torch.int32 or torch.int64, got {describe(topk_ids)}")
    if topk_weights.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"topk_weights: expected a float tensor, got {describe(topk_weights)}")
    ids = topk_ids.to(torch.int32).contiguous()
    weights = topk_weights.to(torch.float32).contiguous()
    return ids, weights


def fused_experts(hidden_states, w1, w2, topk_weights, topk_ids, activation="silu", **_ignored):
    """vLLM's `fused_experts`: `sum_j topk_weights[t, j] * expert_{topk_ids[t, j]}(x[t])`.

    `hidden_states [T, H]`, `w1 [E, 2I, H]` (gate rows, then up rows: vLLM's w13),
    `w2 [E, H, I]`, `topk_weights`/`topk_ids [T, k]`. No shared experts. Returns `[T, H]`
    in the dtype of `hidden_states`. The experts run with bf16 inputs when
    `hidden_states` is bf16 and in f32 otherwise. The weights are copied into the layer's
    layout on every call: an engine calling it per step should hold a `MoeLayer` instead.
    Extra vLLM keyword arguments (`inplace`, quantization options left at their defaults)
    are accepted and ignored.
    """
    if activation != "silu":
        raise ValueError(f"activation: only 'silu' is supported, got {activation!r}")
    for name, t, dims in (("hidden_states", hidden_states, 2), ("w1", w1, 3), ("w2", w2, 3)):
        if not isinstance(t, torch.Tensor) or t.dim() != dims:
            raise ValueError(f"{name}: expected a {dims}-d tensor, got {_what(t)}")
    tokens, h = hidden_states.shape
    e, two_i, _ = w1.shape
    if two_i % 2:
        raise ValueError(f"w1: expected [E, 2I, {h}] (even second dim), got {describe(w1)}")
    i = two_i // 2
    x, x_code = host_view(hidden_states, "hidden_states")
    w1v, w_code = host_view(w1, "w1", shape=[e, 2 * i, h])
    w2v, w2_code = host_view(w2, "w2", shape=[e, h, i])
    if w2_code != w_code:
        raise TypeError(f"w2: dtype must match w1 ({describe(w1)}), got {describe(w2)}")
    ids, weights = _routing(topk_weights, topk_ids, tokens)
    k = ids.shape[1]
    if not 1 <= k <= e:
        raise ValueError(f"topk_ids: top_k = {k} is not in 1..{e} (the experts of w1)")
    out, out_np = out_f32((tokens, h))
    _native.fused_experts(
        x, x_code, w1v, w2v, w_code, tokens, h, i, e, raw(ids), raw(weights), k,
        "bf16" if x_code == "bf16" else "f32", out_np,
    )
    return out.to(hidden_states.dtype)


def _contiguous_range(local_experts, n_experts):
    if local_experts is None:
        return 0, n_experts
    if not isinstance(local_experts, range) or local_experts.step != 1:
        raise TypeError(f"local_experts: expected a range(a, b) with step 1, got {local_experts!r}")
    a, b = local_experts.start, local_experts.stop
    if not 0 <= a <= b <= n_experts:
        raise ValueError(f"local_experts: range({a}, {b}) is not within range(0, {n_experts})")
    return a, b


class MoeLayer(torch.nn.Module):
    """A dots.llm1 MoE layer on dots-moe, called like transformers' `Dots1MoE`.

    Build it with `MoeLayer.from_transformers(module)`. Calling it on `[T, H]` or
    `[batch, seq, H]` returns what `module(x)` returns, in the input's dtype. A layer built with
    `local_experts=range(a, b)` and/or `shared_experts=False` holds those experts only and
    returns its partial output (routing is still computed in full); the partials of layers
    holding every expert once sum to the whole output.
    """

    def __init__(self, native):
        super().__init__()
        self._native = native
        self.hidden_size, self.moe_intermediate_size, self.n_experts, self.top_k, self.n_shared_experts = native.shape

    @classmethod
    def from_transformers(cls, module, local_experts=None, shared_experts=True, precision=None):
        """Copies the weights of a transformers `Dots1MoE` (and reads its `config`).

        `precision`: "f32" keeps the expert inputs in f32, "bf16" rounds them to bf16 as a
        bf16 kernel does; the default follows the weights' dtype.
        """
        cfg = getattr(module, "config", None)
        if cfg is None or not hasattr(module, "experts") or not hasattr(module, "gate"):
            raise TypeError(f"module: expected a transformers Dots1MoE, got {type(module).__name__}")
        n_experts = cfg.n_routed_experts
        a, b = _contiguous_range(local_experts, n_experts)
        gate = module.gate.weight
        w_dtype = module.experts[0].gate_proj.weight.dtype if n_experts else gate.dtype
        if w_dtype not in (torch.float32, torch.bfloat16):
            raise TypeError(f"module: expert weights must be float32 or bfloat16, got {w_dtype}")
        code = "f32" if w_dtype == torch.float32 else "bf16"
        if precision is None:
            precision = code

        alive = []  # converted copies, kept until the native layer has copied them

        def weight(t, name, dtype=w_dtype):
            t = t.detach().to(dtype).contiguous()
            alive.append(t)
            return host_view(t, name)[0]

        bias = getattr(module.gate, "e_score_correction_bias", None)
        bias = None if bias is None else weight(bias, "gate.e_score_correction_bias", torch.float32)
        experts = []
        for e in range(a, b):
            mlp = module.experts[e]
            experts.append(tuple(
                weight(getattr(mlp, p).weight, f"experts.{e}.{p}.weight") for p in ("gate_proj", "up_proj", "down_proj")
            ))
        n_shared = getattr(cfg, "n_shared_experts", 0) or 0
        shared_mlp = None
        if shared_experts and n_shared:
            s = module.shared_experts
            shared_mlp = tuple(
                weight(getattr(s, p).weight, f"shared_experts.{p}.weight") for p in ("gate_proj", "up_proj", "down_proj")
            )
        native = _native.build_layer(
            hidden_size=cfg.hidden_size,
            moe_intermediate_size=cfg.moe_intermediate_size,
            n_experts=n_experts,
            top_k=cfg.num_experts_per_tok,
            n_shared_experts=n_shared,
            n_group=getattr(cfg, "n_group", 1) or 1,
            topk_group=getattr(cfg, "topk_group", 1) or 1,
            scoring=getattr(cfg, "scoring_func", "noaux_tc") or "noaux_tc",
            norm_topk_prob=bool(getattr(cfg, "norm_topk_prob", True)),
            routed_scaling_factor=float(getattr(cfg, "routed_scaling_factor", 1.0)),
            w_dtype=code,
            router_gate=weight(gate, "gate.weight"),
            router_bias=bias,
            expert_begin=a,
            expert_end=b,
            experts=experts,
            shared=bool(shared_experts),
            shared_mlp=shared_mlp,
            precision=precision,
        )
        return cls(native)

    @property
    def local_experts(self):
        """The routed experts this layer holds, as a range."""
        a, b, _ = self._native.shard
        return range(a, b)

    @property
    def has_shared_experts(self):
        """Whether this layer computes the shared experts."""
        return self._native.shard[2] and self.n_shared_experts > 0

    def route(self, hidden_states):
        """`(topk_ids int32 [T, k], topk_weights float32 [T, k])` of `[T, H]` or `[batch, seq, H]`."""
        x = _tokens_hidden(hidden_states, "hidden_states", self.hidden_size)
        xv, code = host_view(x, "hidden_states")
        tokens = x.shape[0]
        ids = torch.empty((tokens, self.top_k), dtype=torch.int32)
        weights = torch.empty((tokens, self.top_k), dtype=torch.float32)
        self._native.route(xv, code, tokens, raw(ids), raw(weights))
        return ids, weights

    def forward_f32(self, hidden_states):
        """The (partial) output `[T, H]` in float32, for `[T, H]` or `[batch, seq, H]` input."""
        x = _tokens_hidden(hidden_states, "hidden_states", self.hidden_size)
        xv, code = host_view(x, "hidden_states")
        out, out_np = out_f32((x.shape[0], self.hidden_size))
        self._native.forward(xv, code, x.shape[0], out_np)
        return out

    def forward_routed_f32(self, hidden_states, topk_ids, topk_weights):
        """The (partial) output `[T, H]` in float32 under a given routing `[T, k]`."""
        x = _tokens_hidden(hidden_states, "hidden_states", self.hidden_size)
        xv, code = host_view(x, "hidden_states")
        tokens = x.shape[0]
        ids, weights = _routing(topk_weights, topk_ids, tokens)
        out, out_np = out_f32((tokens, self.hidden_size))
        self._native.forward_routed(xv, code, tokens, raw(ids), raw(weights), ids.shape[1], out_np)
        return out

    def forward(self, hidden_states):
        return self.forward_f32(hidden_states).to(hidden_states.dtype).view(hidden_states.shape)

    def extra_repr(self):
        r = self.local_experts
        return (
            f"hidden_size={self.hidden_size}, n_experts={self.n_experts}, top_k={self.top_k}, "
            f"local_experts=range({r.start}, {r.stop}), shared_experts={self.has_shared_experts}"
        )


def patch_transformers(model, **kwargs):
    """Replaces every `Dots1MoE` in `model` (in place) by a `MoeLayer` built from it.

    After it, `model(...)` and `model.generate(...)` run their MoE layers on dots-moe.
    `kwargs` go to `MoeLayer.from_transformers`. Returns the number of layers replaced.
    """
    targets = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child).__name__ == "Dots1MoE"
    ]
    for parent, name, child in targets:
        setattr(parent, name, MoeLayer.from_transformers(child, **kwargs))
    return len(targets)
