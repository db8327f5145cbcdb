"""Gradient averaging for item tables replicated on every rank (`sharding: none`).

DDP averages the dense encoder gradients, not the tables'. Their lookups give sparse gradients
(only the rows a batch touched), which NCCL cannot all-reduce: every rank all-gathers the
(row, gradient) pairs of the others, padded to a common length, and sums duplicates, the same on
gloo and NCCL. The full softmax scores every item, so its tables' gradients are dense: a plain
all-reduce.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def all_reduce_table_gradients(module: nn.Module) -> None:
    """Replace each `.grad` in `module`, sparse or dense, by its average over all ranks."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    world = dist.get_world_size()
    for parameter in module.parameters():
        grad = parameter.grad
        if grad is None:
            continue
        if not grad.is_sparse:
            dist.all_reduce(grad)
            grad.div_(world)
            continue
        grad = grad.coalesce()
        rows, values = grad.indices()[0], grad.values()          # (R,), (R, D...)
        count = torch.tensor([rows.numel()], device=rows.device)
        counts = [torch.zeros_like(count) for _ in range(world)]
        dist.all_gather(counts, count)
        longest = int(max(c.item() for c in counts))
        padded_rows = rows.new_zeros(longest)
        padded_rows[: rows.numel()] = rows
        padded_values = values.new_zeros((longest,) + values.shape[1:])
        padded_values[: rows.numel()] = values
        all_rows = [torch.empty_like(padded_rows) for _ in range(world)]
        all_values = [torch.empty_like(padded_values) for _ in range(world)]
        dist.all_gather(all_rows, padded_rows)
        dist.all_gather(all_values, padded_values)
        rows = torch.cat([r[: int(c.item())] for r, c in zip(all_rows, counts)])
        values = torch.cat([v[: int(c.item())] for v, c in zip(all_values, counts)])
        parameter.grad = torch.sparse_coo_tensor(rows.unsqueeze(0), values / world, grad.shape,
                                                 check_invariants=False).coalesce()
