"""All-gather with gradients, for contrastive losses over the global batch.

`gather_features(x)` concatenates every rank's [b, ...] tensor into [world·b, ...] (rank
order). Backward: the gradient w.r.t. the gathered tensor is all-reduced (summed) over
ranks and each rank keeps its own slice. Why summed: with every rank computing the same
global loss L on the gathered features, rank r's local slice of the summed gradient is
world·∂L/∂x_r; DDP / DeepSpeed then *average* parameter gradients over ranks, so the final
gradient is Σ_r ∂L/∂x_r·∂x_r/∂θ = ∂L/∂θ — exactly single-process training on the same
global batch. (The CLIP4Clip-family AllGather returns only the local slice without the sum,
i.e. gradients 1/world too small after averaging; not repeated here.)

Gradient accumulation is unaffected: DeepSpeed divides each micro-batch loss by the
accumulation steps, so an optimizer step sees the mean of the micro-batches' global-batch
gradients. Tensors without gradients (e.g. the bool `has_caption` mask) are gathered
plainly (bool via uint8, which gloo supports).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from vip.train.runtime import world_info

Tensor = torch.Tensor


def _all_gather(x: Tensor, group=None) -> Tensor:
    world = dist.get_world_size(group)
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=0)


class _GatherWithGrad(torch.autograd.Function):
    """[b, ...] per rank → [world·b, ...]; backward: all-reduce(sum) then the local slice."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        ctx.rank = dist.get_rank(group)
        ctx.local = x.shape[0]
        return _all_gather(x.contiguous(), group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous().clone()                                   # [world·b, ...]
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        start = ctx.rank * ctx.local
        return grad[start:start + ctx.local], None


def gather_features(x: Tensor | None, group=None) -> Tensor | None:
    """Concatenate every rank's x along dim 0 (same shape on every rank), gradients flowing
    back as described in the module docstring. Identity without torch.distributed or world 1."""
    if x is None:
        return None
    rank, world = world_info(group)
    if world == 1:
        return x
    if x.requires_grad and torch.is_grad_enabled():
        return _GatherWithGrad.apply(x, group)
    if x.dtype == torch.bool:
        return _all_gather(x.to(torch.uint8).contiguous(), group).bool()
    return _all_gather(x.contiguous(), group)


def same_batch_size(n: int, device) -> bool:
    """True when every rank holds n samples (a short batch anywhere → the step skips it everywhere)."""
    if world_info()[1] == 1:
        return True
    t = torch.tensor([n, -n], device=device, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t[0]) == n and int(-t[1]) == n
