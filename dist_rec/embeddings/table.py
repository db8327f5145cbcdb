"""ItemTables: the per-item state every model shares, on one device.

Rows are dense item ids; row 0 is padding (never scored, never sampled). Three tables:
input vectors (N+1, E) read by the encoder, output vectors (N+1, D) and a bias (N+1,) read by the
scorer and the loss. They are `nn.Embedding(sparse=True)` so a step produces sparse row gradients
that a row-wise optimizer applies to the touched rows only. `embeddings/sharded.py` offers the same
interface with rows split across ranks; models cannot tell them apart.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

# A scoring view of output rows: (item ids (R,), vectors (R, D), bias (R,)) -> (vectors, bias)
# actually scored, e.g. HRNN-meta's mix of each item's ID row with its feature row (eq. 2). A view
# that computes rows makes top-k score in float64 (`chunk_scores`), unless it says it does not
# need that with an attribute `precise = False` (`WithoutItems`).
RowView = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class WithoutItems:
    """A RowView that leaves the flagged items out of every ranking: their bias becomes -inf, so
    they score -inf, below every other item; every other row is scored as stored.

    flagged (N + 1,) bool, e.g. the cold items of a model that cannot score them."""

    precise = False     # rows are not computed: float32 scores them as the plain tables would

    def __init__(self, flagged: torch.Tensor):
        self.flagged = flagged

    def __call__(self, items: torch.Tensor, vectors: torch.Tensor, bias: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        return vectors, bias.masked_fill(self.flagged[items], float("-inf"))


def needs_precise(row_view: RowView | None) -> bool:
    """Whether top-k through `row_view` scores in float64 (see chunk_scores)."""
    return row_view is not None and getattr(row_view, "precise", True)


class ItemTables(nn.Module):
    def __init__(self, num_items: int, embedding_dim: int, output_dim: int, tied: bool = False):
        super().__init__()
        if tied and embedding_dim != output_dim:
            raise ValueError(f"tied item tables need embedding_dim == output_dim, "
                             f"got {embedding_dim} and {output_dim}")
        self.num_items = num_items
        self.tied = tied
        rows = num_items + 1
        self.input = nn.Embedding(rows, embedding_dim, padding_idx=0, sparse=True)
        nn.init.normal_(self.input.weight, std=embedding_dim ** -0.5)
        with torch.no_grad():
            self.input.weight[0].zero_()
        self.output = None if tied else nn.Embedding(rows, output_dim, sparse=True)
        if self.output is not None:
            nn.init.normal_(self.output.weight, std=output_dim ** -0.5)
        self.bias = nn.Embedding(rows, 1, sparse=True)
        nn.init.zeros_(self.bias.weight)

    def embed(self, items: torch.Tensor) -> torch.Tensor:
        """items (...) int64 -> input vectors (..., E); padding rows are zero."""
        return self.input(items)

    def output_rows(self, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """items (...) -> (output vectors (..., D), bias (...))."""
        weight = self.input if self.output is None else self.output
        return weight(items), self.bias(items).squeeze(-1)

    def output_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole output table (N+1, D) and bias (N+1,), for full softmax and evaluation."""
        weight = self.input if self.output is None else self.output
        return weight.weight, self.bias.weight.squeeze(-1)

    def _scoring_rows(self, start: int, stop: int, row_view: RowView | None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """Output rows [start, stop) (vectors (R, D), bias (R,)) as `row_view` shows them."""
        weight, bias = self.output_weight()
        if row_view is None:
            return weight[start:stop], bias[start:stop]
        ids = torch.arange(start, stop, device=weight.device)
        return row_view(ids, weight[start:stop], bias[start:stop])

    @torch.no_grad()
    def topk(self, hidden: torch.Tensor, k: int, chunk_rows: int = 262_144,
             exclude: torch.Tensor | None = None, row_view: RowView | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Full-catalog top-k without materialising (N, catalog) scores.

        hidden (N, D) -> (scores (N, k), item ids (N, k)), best first, equal scores by lower id
        (the same order on sharded tables). `exclude` (N, M) item ids
        (0 = none) are pushed to -inf, e.g. items already seen. `row_view` changes the rows
        scored (see RowView).
        """
        best_scores = hidden.new_full((hidden.shape[0], k), float("-inf"))
        best_items = torch.zeros(hidden.shape[0], k, dtype=torch.int64, device=hidden.device)
        for start in range(1, self.num_items + 1, chunk_rows):
            stop = min(start + chunk_rows, self.num_items + 1)
            scores = chunk_scores(hidden, *self._scoring_rows(start, stop, row_view),
                                  precise=needs_precise(row_view))
            if exclude is not None:
                scores[excluded_cells(exclude, start, stop)] = float("-inf")
            # Top-k of the chunk first, then merge with the running best: merging whole chunks
            # cost twice the matmul itself.
            columns = top_columns(scores, min(k, stop - start))
            best_scores, best_items = best_of(torch.cat([best_scores, scores.gather(1, columns)], 1),
                                              torch.cat([best_items, columns + start], 1), k)
        return best_scores, best_items

    @torch.no_grad()
    def target_ranks(self, hidden: torch.Tensor, targets: torch.Tensor,
                     chunk_rows: int = 262_144, row_view: RowView | None = None,
                     exclude: torch.Tensor | None = None) -> torch.Tensor:
        """0-based rank of each target over the full catalog; ties count against the target.

        hidden (N, D), targets (N,) -> ranks (N,) int64 = #{j != target, j not in exclude :
        score_j >= score_target}. `exclude` (N, M) item ids (0 = none), e.g. items the user has
        seen, do not compete (the target itself always counts as itself). `row_view` changes the
        rows scored (see RowView). Scores are compared as `reference_scores` says, so an item
        whose row equals the target's ties with it.
        """
        weight, bias = self.output_weight()
        target_weight, target_bias = weight[targets], bias[targets]
        if row_view is not None:
            target_weight, target_bias = row_view(targets, target_weight, target_bias)
        target_scores, slack = reference_scores(hidden, target_weight, target_bias)
        ranks = torch.zeros_like(targets)
        for start in range(1, self.num_items + 1, chunk_rows):
            stop = min(start + chunk_rows, self.num_items + 1)
            above = at_or_above(hidden, *self._scoring_rows(start, stop, row_view),
                                target_scores, slack)
            if exclude is not None:
                above[excluded_cells(exclude, start, stop)] = False
            # The target's own column compares equal to itself, however the matmul rounded it.
            inside = (targets >= start) & (targets < stop)
            above[inside.nonzero().squeeze(1), targets[inside] - start] = True
            ranks += above.sum(1)
        return ranks - 1  # minus the target itself

    @torch.no_grad()
    def target_log_likelihoods(self, hidden: torch.Tensor, targets: torch.Tensor,
                               chunk_rows: int = 262_144, row_view: RowView | None = None
                               ) -> torch.Tensor:
        """Each target's log-probability under the full softmax over the catalog (for perplexity).

        hidden (Q, D), targets (Q,) -> (Q,) float64 = score_target - logsumexp_j score_j over the
        items j = 1..num_items, in float64 (a float32 logsumexp over millions of items loses the
        digits that tell two models apart). `row_view` changes the rows scored (see RowView)."""
        weight, bias = self.output_weight()
        target_weight, target_bias = weight[targets], bias[targets]
        if row_view is not None:
            target_weight, target_bias = row_view(targets, target_weight, target_bias)
        target_scores, _ = reference_scores(hidden, target_weight, target_bias)
        chunks = [(start, min(start + chunk_rows, self.num_items + 1))
                  for start in range(1, self.num_items + 1, chunk_rows)]
        return target_scores - log_partition(hidden, (self._scoring_rows(start, stop, row_view)
                                                      for start, stop in chunks))



class RowViewScorer:
    """The tables' scoring interface (output_rows, output_weight, topk, target_ranks,
    target_log_likelihoods) over a RowView of their rows: what a loss or an evaluator scores when
    an item's scored row is not its stored row (HRNN-meta's mixed rows, cold items left out).

    Not a module: its parameters are the tables' and the view's owner's. The tables may be
    single-device or row-sharded: each shard applies the view to its own rows.
    """

    def __init__(self, tables: nn.Module, row_view: RowView):
        self.tables, self.row_view = tables, row_view
        self.num_items = tables.num_items

    def output_rows(self, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """items (...) -> viewed (vectors (..., D), bias (...))."""
        return self.row_view(items, *self.tables.output_rows(items))

    def output_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole viewed table (N+1, D) and bias (N+1,), computed on the fly."""
        device = next(self.tables.parameters()).device
        return self.output_rows(torch.arange(self.num_items + 1, device=device))

    def topk(self, hidden: torch.Tensor, k: int, chunk_rows: int = 262_144,
             exclude: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden (N, D) -> (scores (N, k), item ids (N, k)) over the viewed rows; as the tables'."""
        return self.tables.topk(hidden, k, chunk_rows, exclude, row_view=self.row_view)

    def target_ranks(self, hidden: torch.Tensor, targets: torch.Tensor,
                     chunk_rows: int = 262_144, exclude: torch.Tensor | None = None
                     ) -> torch.Tensor:
        """hidden (N, D), targets (N,) -> (N,) 0-based ranks over the viewed rows; as the tables'."""
        return self.tables.target_ranks(hidden, targets, chunk_rows, row_view=self.row_view,
                                        exclude=exclude)

    def target_log_likelihoods(self, hidden: torch.Tensor, targets: torch.Tensor,
                               chunk_rows: int = 262_144) -> torch.Tensor:
        """hidden (N, D), targets (N,) -> (N,) float64 full-softmax log-probabilities over the
        viewed rows; as the tables'."""
        return self.tables.target_log_likelihoods(hidden, targets, chunk_rows,
                                                  row_view=self.row_view)


def log_partition(hidden: torch.Tensor, chunks: Iterable[tuple[torch.Tensor, torch.Tensor]]
                  ) -> torch.Tensor:
    """hidden (Q, D), chunks of rows [(vectors (C, D), bias (C,))] -> (Q,) float64 logsumexp of
    every row's score; -inf for no rows (a shard may hold none)."""
    partition = hidden.new_full((hidden.shape[0],), float("-inf"), dtype=torch.float64)
    for weight, bias in chunks:
        scores = torch.addmm(bias.double(), hidden.double(), weight.double().t())
        partition = torch.logaddexp(partition, scores.logsumexp(1))
    return partition


def excluded_cells(excluded: torch.Tensor, start: int, stop: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """excluded (Q, M) row ids -> (query rows, chunk columns) of those in rows [start, stop).
    Ids outside the range (0 = none on one device; -1 for another shard's) select nothing."""
    inside = (excluded >= start) & (excluded < stop)
    return inside.nonzero(as_tuple=True)[0], excluded[inside] - start


def chunk_scores(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                 precise: bool) -> torch.Tensor:
    """hidden (Q, D), rows (C, D) and (C,) -> scores (Q, C) in hidden's dtype. Precise, for row
    views: computed in float64 and rounded, so bit-identical rows (which a matmul may round apart
    by an ulp) score the same in any batch or chunk, and top-k orders them by item id (two float64
    scores a few ulps apart straddle a float32 rounding boundary with probability ~1e-9)."""
    if not precise:
        return torch.addmm(bias, hidden, weight.t())
    return torch.addmm(bias.double(), hidden.double(), weight.double().t()).to(hidden.dtype)


def reference_scores(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The targets' scores, row by row: hidden (N, D), their rows (N, D), (N,) -> (scores (N,),
    slack (N,)), both float64.

    A matmul over the catalog rounds differently from this row-wise sum (in float32 an ulp apart
    in ~40% of queries at D = 50-200), so an item with a row bit-identical to the target's (an
    exact twin, e.g. HRNN-meta's cold items of one category) could escape the tie rule. Scores are
    therefore compared in float64 with a slack of 1e-9 of the bound |h| |w| + |b|: far above
    float64 rounding and far below the gap between the scores of distinct float32 rows, so twins
    tie (against the target) and nothing else does.
    """
    hidden, weight, bias = hidden.double(), weight.double(), bias.double()
    scores = (hidden * weight).sum(-1) + bias
    return scores, 1e-9 * (hidden.norm(dim=-1) * weight.norm(dim=-1) + bias.abs())


def at_or_above(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                reference: torch.Tensor, slack: torch.Tensor) -> torch.Tensor:
    """hidden (Q, D), rows (C, D) and (C,), reference (Q,) and slack from `reference_scores` ->
    (Q, C) bool: the row scores at least the reference (within the slack)."""
    scores = torch.addmm(bias.double(), hidden.double(), weight.double().t())
    return scores >= (reference - slack).unsqueeze(1)


def top_columns(scores: torch.Tensor, k: int) -> torch.Tensor:
    """scores (Q, M) -> column indices (Q, k) of the k best; ties at the cut go to lower columns."""
    values, index = scores.topk(k, dim=1, sorted=False)
    kth = values.min(1, keepdim=True).values
    # torch.topk keeps any of the columns tied with the k-th best; rows where it had a choice
    # (rare with real scores) are redone to keep the lowest columns, so the result is unique.
    ties = ((scores == kth).sum(1) > (values == kth).sum(1)).nonzero().squeeze(1)
    if len(ties):
        row_scores, row_kth = scores[ties], kth[ties]
        above, equal = row_scores > row_kth, row_scores == row_kth
        room = k - above.sum(1, keepdim=True)
        index[ties] = (above | (equal & (equal.cumsum(1) <= room))).nonzero()[:, 1].view(-1, k)
    return index


def best_of(scores: torch.Tensor, items: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q, M) scores and their item ids -> the k best (Q, k): score descending, then id ascending."""
    by_item = items.argsort(dim=1, stable=True)
    scores, items = scores.gather(1, by_item), items.gather(1, by_item)
    order = scores.argsort(dim=1, descending=True, stable=True)[:, :k]
    return scores.gather(1, order), items.gather(1, order)
