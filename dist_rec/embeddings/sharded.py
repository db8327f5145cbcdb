"""ShardedItemTables: ItemTables with its rows split across the ranks of a process group.

Layout (the checkpoint's row-wise modulo layout): rank r of W holds the global rows
{i : i % W == r} in increasing order, global row i at local row i // W; row 0 (padding) lives on
rank 0. Each rank keeps its rows of input (E), output (D) and bias as local
`nn.Embedding(sparse=True)` weights named like ItemTables', so RowWiseAdagrad updates a shard
where it lives and keeps its accumulators there.

Lookups (`embed`, `output_rows`) deduplicate the ids, send each to its owner (all-to-all), and the
owners answer with the rows (all-to-all back). The backward returns the row gradients the same way
and leaves a sparse gradient on the owner's local weight.

Gradient semantics are those of data parallelism with DDP: each rank's loss is the mean over its own
events and DDP averages the dense gradients over ranks, so a table row's gradient is
    (sum over ranks of their contributions) / W,
which equals the single-process gradient of the global mean when every rank has as many events.
Negatives drawn with the same seed on every rank are asked of their owners by every rank; the
owner sums the W copies and divides by W, as for any other row.

`output_weight()` all-gathers every row, for the full softmax of small catalogs only: each rank
then holds the whole (N+1, D) table and its dense gradient. `topk` and `target_ranks` are
collectives too: every rank of the group must call them, as many times, in the same order.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from dist_rec.embeddings.table import (ItemTables, RowView, at_or_above, best_of, chunk_scores,
                                       excluded_cells, log_partition, needs_precise,
                                       reference_scores, top_columns)


class _Group:
    """The collectives a shard needs, with a count of the bytes this rank sends to other ranks."""

    def __init__(self, process_group):
        distributed = dist.is_available() and dist.is_initialized()
        self.group = process_group
        self.rank = dist.get_rank(process_group) if distributed else 0
        self.world = dist.get_world_size(process_group) if distributed else 1
        self.bytes_sent = 0

    def all_to_all(self, tensor: torch.Tensor, send: list[int], receive: list[int]) -> torch.Tensor:
        """tensor (sum(send), ...) -> (sum(receive), ...): send[r] leading rows go to rank r."""
        if self.world == 1:
            return tensor
        tensor = tensor.contiguous()
        out = tensor.new_empty((sum(receive),) + tensor.shape[1:])
        dist.all_to_all_single(out, tensor, receive, send, group=self.group)
        row_bytes = tensor.element_size() * int(np.prod(tensor.shape[1:]))
        self.bytes_sent += row_bytes * (sum(send) - send[self.rank])
        return out

    def exchange_counts(self, send: torch.Tensor) -> list[int]:
        """send (W,) rows for each rank -> rows each rank sends to this one, [W]."""
        receive = self.all_to_all(send, [1] * self.world, [1] * self.world)
        return receive.tolist()

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """tensor (n_r, ...) on each rank r -> [tensor of rank r for r in ranks]; n_r may differ."""
        if self.world == 1:
            return [tensor]
        size = torch.tensor([tensor.shape[0]], device=tensor.device)
        sizes = [torch.empty_like(size) for _ in range(self.world)]
        dist.all_gather(sizes, size, group=self.group)
        sizes = [int(s) for s in sizes]
        padded = tensor.new_zeros((max(sizes),) + tensor.shape[1:])
        padded[: tensor.shape[0]] = tensor
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded, group=self.group)
        self.bytes_sent += padded.numel() * padded.element_size() * (self.world - 1)
        return [part[:n] for part, n in zip(parts, sizes)]

    def all_reduce(self, tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        """In place over ranks; counted as a ring would send it: 2 (W-1)/W of the tensor."""
        if self.world > 1:
            dist.all_reduce(tensor, op=op, group=self.group)
            self.bytes_sent += tensor.numel() * tensor.element_size() * 2 * (self.world - 1) // self.world
        return tensor


class _Route:
    """Who asks which rows of whom in one lookup: the all-to-all split sizes both ways."""

    def __init__(self, group: _Group, ids: torch.Tensor, owners: torch.Tensor):
        """ids (U,) unique global ids grouped by owner rank, owners (U,) their ranks."""
        self.group = group
        self.send = torch.bincount(owners, minlength=group.world).tolist()
        self.receive = group.exchange_counts(torch.tensor(self.send, device=ids.device))
        self.requested = group.all_to_all(ids, self.send, self.receive)    # (R,) asked of this rank
        self.local = self.requested // group.world                         # (R,) their local rows

    def reply(self, rows: torch.Tensor) -> torch.Tensor:
        """rows (R, d) of the requested ids -> (U, d) rows of this rank's ids."""
        return self.group.all_to_all(rows, self.receive, self.send)

    def gradient(self, grad: torch.Tensor) -> torch.Tensor:
        """grad (U, d) of this rank's ids -> (R, d) of the requested rows, averaged over ranks."""
        return self.group.all_to_all(grad, self.send, self.receive) / self.group.world


class _Lookup(torch.autograd.Function):
    """Rows of the local weights for a route's ids, concatenated along dim 1; sparse gradients."""

    @staticmethod
    def forward(ctx, route: _Route, padded: tuple[bool, ...], *weights: torch.Tensor) -> torch.Tensor:
        ctx.route, ctx.padded = route, padded
        ctx.shapes = [weight.shape for weight in weights]
        return route.reply(torch.cat([weight.index_select(0, route.local) for weight in weights], 1))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        route = ctx.route
        grad = route.gradient(grad.contiguous())                        # (R, sum of widths)
        grads = []
        for part, shape, padded, needed in zip(grad.split([s[1] for s in ctx.shapes], 1), ctx.shapes,
                                               ctx.padded, ctx.needs_input_grad[2:]):
            # Like nn.Embedding(padding_idx=0): the padding row never receives a gradient.
            keep = route.requested != 0 if padded else slice(None)
            grads.append(torch.sparse_coo_tensor(route.local[keep].unsqueeze(0), part[keep], shape,
                                                 check_invariants=False)
                         if needed else None)
        return (None, None, *grads)


class _GatherRows(torch.autograd.Function):
    """Every rank's local weights, concatenated along dim 1, in global row order; dense gradients."""

    @staticmethod
    def forward(ctx, group: _Group, num_rows: int, *weights: torch.Tensor) -> torch.Tensor:
        ctx.group, ctx.widths = group, [weight.shape[1] for weight in weights]
        return _interleave(group.all_gather(torch.cat(weights, 1)), num_rows)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        group = ctx.group
        # Every rank holds a gradient for every row; the owner keeps the average of its rows.
        total = group.all_reduce(grad.contiguous().clone())
        local = total[group.rank::group.world] / group.world
        return (None, None, *local.split(ctx.widths, 1))


def _interleave(parts: list[torch.Tensor], num_rows: int) -> torch.Tensor:
    """Local rows of ranks 0..W-1 [(n_r, d)] -> (num_rows, d) in global order (row i from i % W)."""
    out = parts[0].new_empty((num_rows,) + parts[0].shape[1:])
    for rank, part in enumerate(parts):
        out[rank::len(parts)] = part
    return out


class ShardedItemTables(nn.Module):
    """Row-wise sharded ItemTables: same methods, rows on their owner rank (see module docstring).

    Initial rows are drawn like ItemTables' (normal, std dim ** -0.5; bias 0; padding row 0) from a
    generator seeded by (seed, rank, world size): the same seed on another world size gives other
    rows. Use `from_full` or `load_rows` to start from given tables.
    """

    def __init__(self, num_items: int, embedding_dim: int, output_dim: int, tied: bool = False,
                 process_group=None, seed: int = 0):
        super().__init__()
        if tied and embedding_dim != output_dim:
            raise ValueError(f"tied item tables need embedding_dim == output_dim, "
                             f"got {embedding_dim} and {output_dim}")
        self.num_items = num_items
        self.tied = tied
        self._group = _Group(process_group)
        rank, world = self._group.rank, self._group.world
        rows = len(range(rank, num_items + 1, world))
        generator = torch.Generator().manual_seed(
            int(np.random.SeedSequence([seed, rank, world]).generate_state(1)[0]))

        def table(dim: int, std: float) -> nn.Embedding:
            weight = torch.randn(rows, dim, generator=generator).mul_(std)
            return nn.Embedding(rows, dim, sparse=True, _weight=weight)

        self.input = table(embedding_dim, embedding_dim ** -0.5)
        if rank == 0:
            with torch.no_grad():
                self.input.weight[0].zero_()
        self.output = None if tied else table(output_dim, output_dim ** -0.5)
        self.bias = nn.Embedding(rows, 1, sparse=True, _weight=torch.zeros(rows, 1))

    @property
    def rank(self) -> int:
        return self._group.rank

    @property
    def world_size(self) -> int:
        return self._group.world

    @property
    def bytes_sent(self) -> int:
        """Bytes this rank has sent to other ranks so far (all-to-all parts addressed to others,
        all-gather inputs times W - 1, all-reduces as a ring: 2 (W-1)/W of the tensor)."""
        return self._group.bytes_sent

    def _output_table(self) -> nn.Embedding:
        return self.input if self.output is None else self.output

    def _rows(self, items: torch.Tensor, weights: list[torch.Tensor],
              padded: tuple[bool, ...]) -> torch.Tensor:
        """items (...) -> the weights' rows concatenated (..., sum of widths), via the owners."""
        ids, rows, world = items.reshape(-1), self.num_items + 1, self._group.world
        if ids.numel():
            low, high = torch.aminmax(ids)
            if low < 0 or high >= rows:
                raise ValueError(f"ShardedItemTables: item ids must be in [0, {self.num_items}], "
                                 f"got min {int(low)} max {int(high)}")
        # Popular items repeat a lot within a batch: each unique id travels once. Sorting by
        # (owner, id) keys puts the unique ids in the order the all-to-all sends them.
        keys, inverse = torch.unique(ids % world * rows + ids, return_inverse=True)
        vectors = _Lookup.apply(_Route(self._group, keys % rows, keys // rows), padded, *weights)
        return vectors.index_select(0, inverse).reshape(*items.shape, vectors.shape[1])

    def embed(self, items: torch.Tensor) -> torch.Tensor:
        """items (...) int64 -> input vectors (..., E); padding rows are zero."""
        return self._rows(items, [self.input.weight], (True,))

    def output_rows(self, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """items (...) -> (output vectors (..., D), bias (...)), one exchange for both."""
        weight = self._output_table().weight
        rows = self._rows(items, [weight, self.bias.weight], (self.tied, False))
        return rows[..., :-1], rows[..., -1]

    def output_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole output table (N+1, D) and bias (N+1,) on every rank, for the full softmax.

        An all-gather of every shard: only for catalogs whose whole table fits on each rank.
        """
        full = _GatherRows.apply(self._group, self.num_items + 1, self._output_table().weight,
                                 self.bias.weight)
        return full[:, :-1], full[:, -1]

    def _scoring_rows(self, start: int, stop: int, row_view: RowView | None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """Local output rows [start, stop) (vectors (R, D), bias (R,)) as `row_view` shows them."""
        weight, bias = self._output_table().weight[start:stop], self.bias.weight[start:stop, 0]
        if row_view is None:
            return weight, bias
        local = torch.arange(start, stop, device=weight.device)
        return row_view(local * self._group.world + self._group.rank, weight, bias)

    @torch.no_grad()
    def topk(self, hidden: torch.Tensor, k: int, chunk_rows: int = 262_144,
             exclude: torch.Tensor | None = None, row_view: RowView | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Full-catalog top-k of this rank's queries; a collective.

        hidden (N, D) -> (scores (N, k), item ids (N, k)), best first; equal scores rank by
        increasing item id, as in ItemTables.topk. `exclude` (N, M) ids (0 = none) are never returned; slots with no
        candidate left (k > items not excluded) hold item 0 with score -inf. Every rank scores
        all ranks' queries (W times N rows: bound N) against its rows; the W local top-k lists
        are then merged. `row_view` changes the rows scored (table.RowView).
        """
        group = self._group
        queries = group.all_gather(hidden)
        everything = torch.cat(queries)                                       # (Q, D)
        local_excluded = self._local_exclusions(hidden, exclude)             # (Q, M)
        best_scores = everything.new_full((everything.shape[0], k), float("-inf"))
        best_items = torch.zeros(everything.shape[0], k, dtype=torch.int64, device=hidden.device)
        for start, stop in self._chunks(chunk_rows):
            scores = chunk_scores(everything, *self._scoring_rows(start, stop, row_view),
                                  precise=needs_precise(row_view))
            scores[excluded_cells(local_excluded, start, stop)] = float("-inf")
            index = top_columns(scores, min(k, stop - start))
            items = (index + start) * group.world + group.rank
            best_scores, best_items = best_of(torch.cat([best_scores, scores.gather(1, index)], 1),
                                            torch.cat([best_items, items], 1), k)
        best_scores, best_items = best_of(torch.cat(group.all_gather(best_scores), 1),
                                        torch.cat(group.all_gather(best_items), 1), k)
        mine = self._own_slice(queries)
        return best_scores[mine], best_items[mine]

    @torch.no_grad()
    def target_ranks(self, hidden: torch.Tensor, targets: torch.Tensor,
                     chunk_rows: int = 262_144, row_view: RowView | None = None,
                     exclude: torch.Tensor | None = None) -> torch.Tensor:
        """0-based rank of each target over the full catalog; ties count against the target.

        hidden (N, D), targets (N,) -> ranks (N,) int64 = #{j != target, j not in exclude :
        score_j >= score_target}, as in ItemTables.target_ranks. A collective: each shard counts
        over its rows, the counts are summed over ranks. `row_view` changes the rows scored
        (table.RowView).
        """
        group = self._group
        queries = group.all_gather(hidden)
        everything, targets = torch.cat(queries), torch.cat(group.all_gather(targets))
        local_excluded = self._local_exclusions(hidden, exclude)             # (Q, M)
        target_scores, slack = self._target_scores(everything, targets, row_view)
        ours, local = targets % group.world == group.rank, targets // group.world
        ranks = torch.zeros_like(targets)
        for start, stop in self._chunks(chunk_rows):
            above = at_or_above(everything, *self._scoring_rows(start, stop, row_view),
                                target_scores, slack)
            above[excluded_cells(local_excluded, start, stop)] = False
            # The target's own column compares equal to itself, however the matmul rounded it.
            inside = ours & (local >= start) & (local < stop)
            above[inside.nonzero().squeeze(1), local[inside] - start] = True
            ranks += above.sum(1)
        return group.all_reduce(ranks)[self._own_slice(queries)] - 1        # minus the target itself

    @torch.no_grad()
    def target_log_likelihoods(self, hidden: torch.Tensor, targets: torch.Tensor,
                               chunk_rows: int = 262_144, row_view: RowView | None = None
                               ) -> torch.Tensor:
        """Each target's full-softmax log-probability, as ItemTables.target_log_likelihoods;
        a collective: each shard's logsumexp over its rows, combined over ranks."""
        group = self._group
        queries = group.all_gather(hidden)
        everything, targets = torch.cat(queries), torch.cat(group.all_gather(targets))
        target_scores, _ = self._target_scores(everything, targets, row_view)
        partition = log_partition(everything, (self._scoring_rows(start, stop, row_view)
                                               for start, stop in self._chunks(chunk_rows)))
        partition = torch.stack(group.all_gather(partition)).logsumexp(0)
        return (target_scores - partition)[self._own_slice(queries)]

    def _target_scores(self, everything: torch.Tensor, targets: torch.Tensor,
                       row_view: RowView | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Every rank's queries (Q, D) and targets (Q,) -> the targets' scores and slack (Q,)
        from `reference_scores`, on every rank; a collective. The owner of a target computes its
        score row-wise, as ItemTables does; the others add 0."""
        group = self._group
        weight, bias = self._output_table().weight, self.bias.weight[:, 0]
        ours = targets % group.world == group.rank
        local = targets // group.world
        target_weight, target_bias = weight[local[ours]], bias[local[ours]]
        if row_view is not None:
            target_weight, target_bias = row_view(targets[ours], target_weight, target_bias)
        reference = everything.new_zeros(2, len(targets), dtype=torch.float64)  # scores, slack
        reference[:, ours] = torch.stack(reference_scores(everything[ours], target_weight,
                                                          target_bias))
        return tuple(group.all_reduce(reference))

    def _local_exclusions(self, hidden: torch.Tensor, exclude: torch.Tensor | None) -> torch.Tensor:
        """Every rank's `exclude` (N, M) item ids (0 = none; None: none) as this shard's local
        rows (Q, M'), -1 where another shard owns the item; a collective."""
        group = self._group
        if exclude is None:
            exclude = torch.zeros(hidden.shape[0], 0, dtype=torch.int64, device=hidden.device)
        width = group.all_reduce(torch.tensor([exclude.shape[1]], device=hidden.device),
                                 dist.ReduceOp.MAX).item()
        excluded = torch.cat(group.all_gather(nn.functional.pad(exclude, (0, width - exclude.shape[1]))))
        ours = (excluded > 0) & (excluded % group.world == group.rank)
        return torch.where(ours, excluded // group.world, -1)

    def _chunks(self, chunk_rows: int) -> list[tuple[int, int]]:
        """Local row ranges to score; rank 0 skips its local row 0, the padding item."""
        rows = self.bias.weight.shape[0]
        first = 1 if self._group.rank == 0 else 0
        return [(start, min(start + chunk_rows, rows)) for start in range(first, rows, chunk_rows)]

    def _own_slice(self, queries: list[torch.Tensor]) -> slice:
        """Where this rank's queries sit in the concatenation of every rank's."""
        start = sum(len(q) for q in queries[: self._group.rank])
        return slice(start, start + len(queries[self._group.rank]))

    @classmethod
    def from_full(cls, tables: ItemTables, process_group=None) -> ShardedItemTables:
        """This rank's shard of single-device ItemTables (every rank passes the same tables)."""
        output_dim = (tables.input if tables.output is None else tables.output).weight.shape[1]
        sharded = cls(tables.num_items, tables.input.weight.shape[1], output_dim, tables.tied,
                      process_group)
        rank, world = sharded.rank, sharded.world_size
        sharded.load_rows({name.removesuffix(".weight"): parameter.detach()[rank::world]
                           for name, parameter in tables.named_parameters()})
        return sharded.to(tables.input.weight.device)

    @torch.no_grad()
    def load_rows(self, rows: dict[str, torch.Tensor]) -> None:
        """Copy this rank's rows in: {"input", "output" (untied only), "bias"} -> (local rows, ...),
        e.g. checkpoint.load_checkpoint(storage, path, rank, world_size).tables. Other keys (the
        optimizer accumulators) are left to the caller."""
        tables = {name.removesuffix(".weight"): parameter for name, parameter in self.named_parameters()}
        for key, parameter in tables.items():  # all checked before any is copied
            if key not in rows:
                raise KeyError(f"ShardedItemTables.load_rows: no rows for table {key!r}; "
                               f"got {sorted(rows)}")
            if rows[key].shape != parameter.shape:
                raise ValueError(f"ShardedItemTables.load_rows: table {key!r} of rank {self.rank} "
                                 f"needs shape {tuple(parameter.shape)}, got {tuple(rows[key].shape)}")
        for key, parameter in tables.items():
            parameter.copy_(rows[key])

    @torch.no_grad()
    def gather_rows(self) -> dict[str, torch.Tensor]:
        """Every table in global row order on every rank, named like ItemTables' parameters
        ({"input": (N+1, E), "output": (N+1, D), "bias": (N+1, 1)}), for export and tests."""
        return {name.removesuffix(".weight"): _interleave(self._group.all_gather(parameter),
                                                          self.num_items + 1)
                for name, parameter in self.named_parameters()}
