"""RowWiseAdagrad: Adagrad with one accumulator per table row, for sparse embedding gradients.

For every row r in a step's gradient g:
    sum[r]   += mean(g[r] ** 2)
    param[r] -= lr * g[r] / (sqrt(sum[r]) + eps)
One scalar per row instead of one per weight keeps the state at 1/D of the table (TorchRec and
FBGEMM call this row-wise Adagrad). A sparse gradient (nn.Embedding(sparse=True)) touches only its
rows: nothing proportional to the table is read or written. Dense gradients (tiny tables, or a
full softmax through output_weight()) update every row, which is exact because a zero gradient row
leaves both its accumulator and its values unchanged.
"""
from __future__ import annotations

import torch


class RowWiseAdagrad(torch.optim.Optimizer):
    """params: tensors whose first dimension indexes rows (a 1-D tensor has scalar rows)."""

    def __init__(self, params, lr: float = 0.05, eps: float = 1e-10):
        if not lr > 0:
            raise ValueError(f"RowWiseAdagrad: lr must be > 0, got {lr}")
        if not eps > 0:  # a row with zero gradient and zero state would divide 0 by 0
            raise ValueError(f"RowWiseAdagrad: eps must be > 0, got {eps}")
        super().__init__(params, {"lr": lr, "eps": eps})
        for group in self.param_groups:
            for param in group["params"]:
                # Created eagerly so a fresh optimizer's state_dict loads a saved one.
                self.state[param]["sum"] = torch.zeros(param.shape[0], dtype=torch.float32,
                                                       device=param.device)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                state_sum = self.state[param]["sum"]
                if state_sum.shape[0] != param.shape[0]:
                    raise ValueError(f"RowWiseAdagrad: parameter has {param.shape[0]} rows but its "
                                     f"state {state_sum.shape[0]}; call grow(param) after resizing")
                if param.grad.is_sparse:
                    _sparse_step(param, param.grad, state_sum, group["lr"], group["eps"])
                else:
                    _dense_step(param, param.grad, state_sum, group["lr"], group["eps"])
        return loss

    @torch.no_grad()
    def grow(self, param: torch.Tensor) -> None:
        """After param.data gained rows (the catalog grew), append zero accumulators for them."""
        if param not in self.state:
            raise ValueError("RowWiseAdagrad.grow: parameter is not optimised by this optimizer")
        state_sum = self.state[param]["sum"]
        extra = param.shape[0] - state_sum.shape[0]
        if extra < 0:
            raise ValueError(f"RowWiseAdagrad.grow: parameter shrank from {state_sum.shape[0]} "
                             f"to {param.shape[0]} rows")
        self.state[param]["sum"] = torch.cat([state_sum, state_sum.new_zeros(extra)])


def _sparse_step(param: torch.Tensor, grad: torch.Tensor, state_sum: torch.Tensor,
                 lr: float, eps: float) -> None:
    # Coalescing sums repeated rows first: one update per row, as if the gradient were dense.
    grad = grad.coalesce()
    rows = grad.indices()[0]
    values = grad.values()
    state_sum.index_add_(0, rows, _mean_square(values))
    scale = state_sum.index_select(0, rows).sqrt_().add_(eps)
    param.index_add_(0, rows, values / _per_row(scale, values), alpha=-lr)


def _dense_step(param: torch.Tensor, grad: torch.Tensor, state_sum: torch.Tensor,
                lr: float, eps: float) -> None:
    state_sum.add_(_mean_square(grad))
    param.add_(grad / _per_row(state_sum.sqrt().add_(eps), grad), alpha=-lr)


def _mean_square(values: torch.Tensor) -> torch.Tensor:
    """(R, ...) -> (R,) float32 mean of squares over everything but the row."""
    return values.float().square().reshape(values.shape[0], -1).mean(1)


def _per_row(row_values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(R,) -> broadcastable against `like` (R, ...), in like's dtype."""
    return row_values.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))
