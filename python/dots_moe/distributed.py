"""Expert parallelism on torch.distributed: dots-moe brings no transport of its own.

`ExpertParallel(module, mode, group)` wraps a transformers `Dots1MoE`: each rank of `group`
holds a contiguous, as-equal-as-possible range of the routed experts (the first
`E % world` ranks hold one more), and the wrapper is called like the module.

- `mode="all_reduce"`: every rank holds the same tokens. Each computes its experts'
  partial output (rank 0 adds the shared experts) and the partials are summed with
  `all_reduce`. With `fixed_order=True` they are gathered and summed in rank order instead,
  so the result is the same bits on every rank and every run whatever the backend's
  reduction algorithm.
- `mode="all_to_all"`: each rank holds its own tokens (data-parallel attention). A rank
  routes its tokens (the router is whole on every rank), sends each token once to every
  rank that owns one of its experts (`all_to_all_single`: the hidden row plus its `k` ids
  and weights), runs its own experts on what it received under the sender's routing,
  sends the weighted rows back, and sums them in rank order, plus the shared experts it
  runs on its own tokens. The DeepEP dispatch/combine pattern, without its kernels.

The same code runs on gloo (CPU tensors) and NCCL: the payloads are plain byte and
float32 tensors. The experts themselves run on the CPU layer, so on NCCL the tensors
are moved to the group's device for the collectives only.
"""

import torch
import torch.distributed as dist

from . import MoeLayer, _tokens_hidden

__all__ = ["ExpertParallel", "expert_bounds"]


def expert_bounds(n_experts, world):
    """Rank `r` holds experts `bounds[r]..bounds[r + 1]`: contiguous, sizes differ by <= 1."""
    base, extra = divmod(n_experts, world)
    bounds = [0]
    for r in range(world):
        bounds.append(bounds[-1] + base + (1 if r < extra else 0))
    return bounds


class ExpertParallel(torch.nn.Module):
    """One rank's part of a `Dots1MoE` under expert parallelism (see the module docs)."""

    def __init__(self, module, mode="all_reduce", group=None, precision=None, fixed_order=False, bounds=None):
        super().__init__()
        if mode not in ("all_reduce", "all_to_all"):
            raise ValueError(f"mode: expected 'all_reduce' or 'all_to_all', got {mode!r}")
        if not dist.is_initialized():
            raise RuntimeError("ExpertParallel needs torch.distributed to be initialised (init_process_group)")
        self.mode = mode
        self.group = group
        self.fixed_order = fixed_order
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        n_experts = module.config.n_routed_experts
        self.bounds = list(bounds) if bounds is not None else expert_bounds(n_experts, self.world)
        if len(self.bounds) != self.world + 1 or self.bounds[0] != 0 or self.bounds[-1] != n_experts or any(
            a > b for a, b in zip(self.bounds, self.bounds[1:])
        ):
            raise ValueError(f"bounds: expected {self.world + 1} non-decreasing cuts from 0 to {n_experts}, got {bounds}")
        local = range(self.bounds[self.rank], self.bounds[self.rank + 1])
        if mode == "all_reduce":
            self.experts = MoeLayer.from_transformers(
                module, local_experts=local, shared_experts=self.rank == 0, precision=precision
            )
            self.shared = None
        else:
            self.experts = MoeLayer.from_transformers(module, local_experts=local, shared_experts=False, precision=precision)
            self.shared = MoeLayer.from_transformers(
                module, local_experts=range(0, 0), shared_experts=True, precision=precision
            )
        self.hidden_size = self.experts.hidden_size
        self.top_k = self.experts.top_k
        self.last_bytes_sent = 0  # this rank's payload to other ranks in the last call
        self.last_rows_received = 0  # all_to_all: token rows this rank's experts ran on
        backend = dist.get_backend(group)
        self.device = torch.device("cpu") if backend == "gloo" else torch.device("cuda", torch.cuda.current_device())

    def _to_comm(self, t):
        return t if self.device.type == "cpu" else t.to(self.device)

    def forward(self, hidden_states):
        x = _tokens_hidden(hidden_states, "hidden_states", self.hidden_size)
        out = self._all_reduce(x) if self.mode == "all_reduce" else self._all_to_all(x)
        return out.to(hidden_states.dtype).view(hidden_states.shape)

    def _all_reduce(self, x):
        part = self.experts.forward_f32(x)
        self.last_bytes_sent = part.numel() * 4 * 2 * (self.world - 1) // self.world  # a ring all-reduce
        if self.fixed_order:
            parts = [torch.empty_like(self._to_comm(part)) for _ in range(self.world)]
            dist.all_gather(parts, self._to_comm(part), group=self.group)
            self.last_bytes_sent = part.numel() * 4 * (self.world - 1)
            total = torch.zeros_like(part)
            for p in parts:
                total += p.cpu()
            return total
        part = self._to_comm(part)
        dist.all_reduce(part, op=dist.ReduceOp.SUM, group=self.group)
        return part.cpu()

    def _exchange(self, send, send_counts, recv_counts):
        """`all_to_all_single` of the rows of `send` (split by rank), returning the received rows."""
        recv = torch.empty((sum(recv_counts),) + tuple(send.shape[1:]), dtype=send.dtype, device=self.device)
        dist.all_to_all_single(
            recv, self._to_comm(send), output_split_sizes=recv_counts, input_split_sizes=send_counts, group=self.group
        )
        return recv.cpu()

    def _all_to_all(self, x):
        tokens, h, k = x.shape[0], self.hidden_size, self.top_k
        ids, weights = self.experts.route(x)
        # Which ranks each token goes to: those owning at least one of its experts.
        owner = torch.bucketize(ids.long(), torch.tensor(self.bounds[1:], dtype=torch.long), right=True)
        goes = torch.zeros((tokens, self.world), dtype=torch.bool)
        goes.scatter_(1, owner, True)
        token_lists = [torch.nonzero(goes[:, r], as_tuple=False).flatten() for r in range(self.world)]
        send_counts = [len(t) for t in token_lists]
        counts = torch.tensor(send_counts, dtype=torch.int64, device=self.device)
        recv_counts_t = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts_t, counts, group=self.group)
        recv_counts = [int(c) for c in recv_counts_t.cpu()]

        # Dispatch: per token one byte row = hidden row (its own dtype), k ids, k weights.
        order = torch.cat(token_lists) if tokens else torch.zeros(0, dtype=torch.long)
        n, x_bytes = len(order), h * x.element_size()
        row = torch.cat(
            [
                x[order].contiguous().view(torch.uint8).reshape(n, x_bytes),
                ids[order].contiguous().view(torch.uint8).reshape(n, 4 * k),
                weights[order].contiguous().view(torch.uint8).reshape(n, 4 * k),
            ],
            dim=1,
        )
        recv = self._exchange(row, send_counts, recv_counts)
        m = recv.shape[0]
        self.last_rows_received = m
        rx = recv[:, :x_bytes].contiguous().view(x.dtype).reshape(m, h)
        rids = recv[:, x_bytes : x_bytes + 4 * k].contiguous().view(torch.int32).reshape(m, k)
        rw = recv[:, x_bytes + 4 * k :].contiguous().view(torch.float32).reshape(m, k)

        # This rank's experts on what it received, under the senders' routing.
        partial = self.experts.forward_routed_f32(rx, rids, rw)

        # Combine: the weighted rows go back; each token sums them in rank order.
        back = self._exchange(partial, recv_counts, send_counts)
        others = sum(c for r, c in enumerate(send_counts) if r != self.rank)
        returned = sum(c for r, c in enumerate(recv_counts) if r != self.rank)
        self.last_bytes_sent = others * row.shape[1] + returned * h * 4
        out = torch.zeros((tokens, h), dtype=torch.float32)
        start = 0
        for r in range(self.world):
            count = send_counts[r]
            out.index_add_(0, token_lists[r], back[start : start + count])
            start += count
        return out + self.shared.forward_routed_f32(x, ids, weights)

    def extra_repr(self):
        r = self.experts.local_experts
        return f"mode={self.mode!r}, rank={self.rank}/{self.world}, local_experts=range({r.start}, {r.stop})"
