"""Losses over item scores, one interface for every model:

    loss = build_loss(sampler_config, item_counts)        # item_counts (C,), row 0 = padding
    value = loss(hidden, targets, tables, weights, generator)

hidden (N, D) are the encoder states of the N events with a target, targets (N,) their next-item
ids (>= 1: padding steps removed), weights (N,) per-event rewards or None, generator a
torch.Generator on the loss's device (the same seed on every rank draws the same negatives).
`tables` is anything with output_rows(ids) -> (vectors (..., D), bias (...)) and output_weight() ->
(weight (C, D), bias (C,)): ItemTables or its row-sharded twin. The score of item j is
phi_j = hidden . v_j + b_j.

Rewards enter in the one-against-all form of the HRNN paper (sec. 3.3):
    loss_t = -(w_t * phi_target - log sum_j exp(phi_j))
a weighted positive and an unweighted normaliser, so a low-reward event (a page view next to a
purchase) acts as an implicit negative. Every loss is the mean over the N events.
"""
from __future__ import annotations

import math
import weakref

import numpy as np
import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from dist_rec.config import SamplerConfig
from dist_rec.sampling.alias import AliasSampler

# Rows of logits per softmax block: about 4 MiB, so a block's five passes stay in cache while
# each op still has enough work for its threads (smaller blocks lost to thread start-up on 2 cores).
_SOFTMAX_BLOCK_BYTES = 2 ** 22
LOSSES = ("full_softmax", "sampled_softmax", "bpr_max", "bce")


def full_softmax(hidden: torch.Tensor, targets: torch.Tensor, tables,
                 weights: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy over every item 1..C-1 (row 0 is padding): the reference loss.

    Materialises (N, C - 1) logits, so it is for small catalogs, tests and evaluation.
    """
    weight, bias = tables.output_weight()
    logits = torch.addmm(bias[1:], hidden, weight[1:].t())
    positive = logits.gather(1, (targets - 1).unsqueeze(1)).squeeze(1)
    return _one_against_all(positive, torch.logsumexp(logits, 1), weights)


def sampled_softmax(hidden: torch.Tensor, targets: torch.Tensor, tables, negatives: torch.Tensor,
                    negative_correction: torch.Tensor, weights: torch.Tensor | None = None,
                    in_batch_correction: torch.Tensor | None = None,
                    workspace: "Workspace | None" = None) -> torch.Tensor:
    """Softmax over {target} + K shared negatives (+ the other rows' targets), log-Q corrected.

    negatives (K,) ids and negative_correction (K,) = log of each one's expected number of draws
    (log K q_j), subtracted from its logit so the sampled normaliser estimates the full one:
        Z ~ exp(phi_t) + sum_{c in sample, c != t} exp(phi_c) / (K q_c)
    The target is in every row's candidates with certainty, not by sampling, so its logit is not
    corrected; a negative equal to the row's target (an accidental hit) is dropped because the
    target's mass is already counted. With every item drawn exactly m times and q uniform this
    is the full softmax; correcting the target as well (the TensorFlow convention) stays biased
    as K grows whenever K q_t != 1. With in_batch_correction (N,) row i also scores the other
    rows' targets, each corrected by its entry (the log expected count of that item).
    `workspace` keeps the (N, K) logits buffer between calls (SampledLoss passes its own).
    """
    workspace = Workspace() if workspace is None else workspace
    vectors, bias = tables.output_rows(targets)
    negative_vectors, negative_bias = tables.output_rows(negatives)
    positive = (hidden * vectors).sum(1) + bias
    # The positive never enters the (N, K) block, so nothing is concatenated: the normaliser is
    # merged from per-block logsumexps.
    parts = [positive, _ScoresLogSumExp.apply(hidden, negative_vectors,
                                              negative_bias - negative_correction, targets, negatives,
                                              workspace, "negatives")]
    if in_batch_correction is not None:  # an (N, N) block; own target and repeats are hits
        parts.append(_ScoresLogSumExp.apply(hidden, vectors, bias - in_batch_correction,
                                            targets, targets, workspace, "in_batch"))
    return _one_against_all(positive, torch.logsumexp(torch.stack(parts, 1), 1), weights)


def bpr_max(hidden: torch.Tensor, targets: torch.Tensor, tables, negatives: torch.Tensor,
            weights: torch.Tensor | None = None, regularization: float = 1.0) -> torch.Tensor:
    """BPR-max (Hidasi & Karatzoglou, 2018) with K shared negatives (K,).

    loss = -w log sum_j s_j sigmoid(r_i - r_j) + lambda sum_j s_j r_j^2, s = softmax_j(r_j) over
    the negatives; accidental hits are dropped (s_j = 0), so a row whose negatives are all hits
    costs 0.
    """
    positive, scores = _scores(hidden, targets, tables, negatives)
    log_share = torch.log_softmax(scores, 1)  # log s_j
    ranking = -torch.logsumexp(log_share + F.logsigmoid(positive.unsqueeze(1) - scores), 1)
    dropped = scores == torch.finfo(scores.dtype).min
    penalty = (log_share.exp() * scores.masked_fill(dropped, 0.0).square()).sum(1)
    if weights is not None:
        ranking = ranking * weights
    return (ranking + regularization * penalty).mean()


def binary_cross_entropy(hidden: torch.Tensor, targets: torch.Tensor, tables,
                         negatives: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """One sigmoid per positive and per negative: -w log s(r_i) - sum_j log(1 - s(r_j)).

    K shared negatives (K,) (SASRec/Caser style, summed); accidental hits are dropped.
    """
    positive, scores = _scores(hidden, targets, tables, negatives)
    positive_term = F.softplus(-positive)  # -log sigmoid(r_i)
    if weights is not None:
        positive_term = positive_term * weights
    return (positive_term + F.softplus(scores).sum(1)).mean()  # a dropped hit adds softplus(-big) = 0


class FullSoftmax:
    """The reference loss; ignores the generator."""

    def __call__(self, hidden, targets, tables, weights=None, generator=None) -> torch.Tensor:
        return full_softmax(hidden, targets, tables, weights)

    def to(self, device: torch.device | str) -> "FullSoftmax":
        return self

    def update_counts(self, item_counts: np.ndarray | torch.Tensor) -> None:
        """Nothing depends on popularity."""


class SampledLoss:
    """K shared negatives per call from an alias sampler over count^alpha, then one of
    sampled_softmax (log-Q corrected), bpr_max or binary_cross_entropy."""

    def __init__(self, kind: str, item_counts: np.ndarray | torch.Tensor, num_negatives: int,
                 alpha: float = 0.75, in_batch: bool = False, regularization: float = 1.0):
        if kind not in LOSSES[1:]:
            raise ValueError(f"SamplerConfig.loss: unknown sampled loss {kind!r}; known {LOSSES[1:]}")
        if num_negatives < 1:
            raise ValueError(f"SamplerConfig.num_negatives must be >= 1, got {num_negatives}")
        if in_batch and kind != "sampled_softmax":
            raise ValueError(f"SamplerConfig.in_batch_negatives needs loss='sampled_softmax', got {kind!r}")
        self.kind, self.num_negatives, self.in_batch = kind, num_negatives, in_batch
        self.alpha, self.regularization = alpha, regularization
        self.device = torch.device("cpu")
        self.workspace = Workspace()
        self.update_counts(item_counts)

    def update_counts(self, item_counts: np.ndarray | torch.Tensor) -> None:
        """New counts (the catalog may have grown): rebuild the sampler and the log-Q tables."""
        self.sampler = AliasSampler.from_counts(item_counts, self.alpha).to(self.device)
        # In-batch candidates the sampler never draws (count 0: new or filtered items) get the
        # rarest drawable item's log q, so their corrected logit stays finite.
        self.log_q = _floored(self.sampler.log_q)
        # In-batch negatives are drawn from the data: q = count / total.
        counts = torch.as_tensor(item_counts, dtype=torch.float64).cpu().clamp(min=0)
        counts[0] = 0.0
        self.log_data_q = _floored(torch.log(counts / counts.sum()).float()).to(self.device)

    def to(self, device: torch.device | str) -> "SampledLoss":
        self.device = torch.device(device)
        self.sampler = self.sampler.to(device)
        self.log_q, self.log_data_q = self.log_q.to(device), self.log_data_q.to(device)
        return self

    def __call__(self, hidden: torch.Tensor, targets: torch.Tensor, tables,
                 weights: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
        negatives = self.sampler.sample(self.num_negatives, generator)
        if self.kind == "bpr_max":
            return bpr_max(hidden, targets, tables, negatives, weights, self.regularization)
        if self.kind == "bce":
            return binary_cross_entropy(hidden, targets, tables, negatives, weights)
        in_batch = self.correction(targets, len(targets)) if self.in_batch else None
        correction = self.correction(negatives, len(targets))
        return sampled_softmax(hidden, targets, tables, negatives, correction, weights, in_batch,
                               self.workspace)

    def correction(self, items: torch.Tensor, batch_size: int) -> torch.Tensor:
        """items (M,) -> log of their expected count among one row's sampled candidates (M,).

        K draws from q give K q_j; with in-batch negatives the N - 1 other targets add
        (N - 1) p_j, p the data frequency: the candidates are a mixture of both samples.
        """
        sampled = self.log_q[items] + math.log(self.num_negatives)
        if not self.in_batch or batch_size < 2:
            return sampled
        return torch.logaddexp(sampled, self.log_data_q[items] + math.log(batch_size - 1))


def build_loss(config: SamplerConfig, item_counts: np.ndarray | torch.Tensor
               ) -> FullSoftmax | SampledLoss:
    """The loss named by config.loss; item_counts (C,) drive the sampler (q ∝ count^alpha)."""
    if config.loss == "full_softmax":
        return FullSoftmax()
    if config.loss not in LOSSES:
        raise ValueError(f"SamplerConfig.loss: unknown loss {config.loss!r}; known {LOSSES}")
    return SampledLoss(config.loss, item_counts, config.num_negatives, config.alpha,
                       config.in_batch_negatives, config.bpr_regularization)


def event_weights(type_codes: torch.Tensor, event_types: tuple[str, ...],
                  rewards: dict[str, float]) -> torch.Tensor | None:
    """type_codes (N,) (1..n in DataConfig.event_types order) -> rewards (N,), or None if no map.

    Pass the *target* event's type. Types missing from the map get 1; padding code 0 gets 0.
    """
    if not rewards:
        return None
    unknown = set(rewards) - set(event_types)
    if unknown:
        raise ValueError(f"SamplerConfig.event_weights: unknown event type(s) {sorted(unknown)}; "
                         f"DataConfig.event_types = {list(event_types)}")
    bad = {name: value for name, value in rewards.items() if not (math.isfinite(value) and value >= 0)}
    if bad:
        raise ValueError(f"SamplerConfig.event_weights: weights must be finite and >= 0, got {bad}")
    table = torch.tensor([0.0] + [float(rewards.get(name, 1.0)) for name in event_types],
                         device=type_codes.device)
    return table[type_codes]


class Workspace:
    """Reusable logits buffers for the fused normaliser, one per name.

    A fresh (N, K) float32 buffer (64 MiB at N = 8192, K = 2048) is mapped and page-faulted anew
    at every step, which cost more than the softmax passes over it (~55 ms on one core of the
    2-core VM). A buffer is handed out again only once the autograd graph that saved it is gone:
    each forward leaves a token on its ctx, and a dead weak reference to it says the graph, and
    the softmax it saved for backward, no longer exist.
    """

    def __init__(self):
        self._buffers: dict[str, tuple[torch.Tensor, weakref.ref]] = {}

    def take(self, name: str, rows: int, cols: int, like: torch.Tensor) -> tuple[torch.Tensor, object]:
        """-> (uninitialised (rows, cols) tensor of like's dtype and device, its lease token)."""
        token = _Lease()
        buffer, lease = self._buffers.get(name, (None, _no_lease))
        if lease() is not None:  # still saved by a live graph: a one-off buffer
            return like.new_empty(rows, cols), token
        fits = buffer is not None and buffer.numel() >= rows * cols
        if not fits or (buffer.dtype, buffer.device) != (like.dtype, like.device):
            buffer = like.new_empty(rows * cols)
        self._buffers[name] = buffer, weakref.ref(token)
        return buffer[:rows * cols].view(rows, cols), token


class _Lease:
    """Alive exactly as long as the autograd graph that holds a workspace buffer."""


def _no_lease() -> None:
    return None


class _ScoresLogSumExp(torch.autograd.Function):
    """logsumexp_j(hidden . vectors_j + offsets_j) over candidates j that are not the row's target.

    hidden (N, D), vectors (M, D), offsets (M,), targets (N,), candidates (M,) -> (N,); the
    (N, M) buffer comes from workspace.take(name, ...).
    The hot path of sampled softmax, fused by hand: one addmm into a reused buffer, then max,
    exp and sum in place, so the buffer becomes the softmax that backward feeds to the gradient
    matmuls. Autograd's addmm + logsumexp allocates it about five times and ran ~1.5-1.9x slower
    at N = 8192, M = 2048, D = 128 on 2 cores.
    """

    @staticmethod
    def forward(ctx, hidden, vectors, offsets, targets, candidates, workspace, name):
        probs, ctx.lease = workspace.take(name, hidden.shape[0], vectors.shape[0], hidden)
        torch.addmm(offsets, hidden, vectors.t(), out=probs)
        _drop_hits_(probs, targets, candidates)
        ctx.save_for_backward(hidden, vectors, probs)
        return _softmax_(probs)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        hidden, vectors, probs = ctx.saved_tensors
        # d/d logits = grad_i * probs_ij; the row scale is applied to the (N, D) sides instead,
        # so no second (N, M) tensor exists and probs stays intact for a retained graph. The
        # offsets' gradient probs^T grad rides along as one more row of the vectors' matmul: one
        # pass over probs, not two (in this orientation MKL takes D + 1 rows at no measurable cost).
        row_grad = grad.unsqueeze(1)
        both = torch.cat([hidden * row_grad, row_grad], 1).t() @ probs       # (D + 1, M)
        return (probs @ vectors) * row_grad, both[:-1].t(), both[-1], None, None, None, None


def _softmax_(logits: torch.Tensor) -> torch.Tensor:
    """logits (N, M) -> row logsumexp (N,); logits become their row softmax, in place.

    In blocks of rows that stay in cache, so max, subtract, exp, sum and divide read memory
    about once instead of five times (43 ms instead of 52 at N = 8192, M = 2048 on one core;
    the exp itself is most of what is left).
    """
    rows = max(1, _SOFTMAX_BLOCK_BYTES // (logits.shape[1] * logits.element_size()))
    result = logits.new_empty(logits.shape[0], 1)
    for start in range(0, logits.shape[0], rows):
        block = logits[start:start + rows]
        top = block.amax(1, keepdim=True)
        total = block.sub_(top).exp_().sum(1, keepdim=True)
        block.div_(total)
        torch.add(top, total.log_(), out=result[start:start + rows])
    return result.squeeze(1)


def _one_against_all(positive: torch.Tensor, normaliser: torch.Tensor,
                     weights: torch.Tensor | None) -> torch.Tensor:
    """mean_t(log Z_t - w_t phi_t); positive, normaliser, weights (N,)."""
    if weights is not None:
        positive = positive * weights
    return (normaliser - positive).mean()


def _scores(hidden: torch.Tensor, targets: torch.Tensor, tables,
            negatives: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-> positive scores (N,), negative scores (N, K) with accidental hits dropped."""
    vectors, bias = tables.output_rows(targets)
    negative_vectors, negative_bias = tables.output_rows(negatives)
    positive = (hidden * vectors).sum(1) + bias
    scores = torch.addmm(negative_bias, hidden, negative_vectors.t())
    _drop_hits_(scores, targets, negatives)
    return positive, scores


@torch.no_grad()
def _drop_hits_(logits: torch.Tensor, targets: torch.Tensor, candidates: torch.Tensor) -> None:
    """Drop logits[i, j] where candidates[j] == targets[i]; logits (N, M), in place.

    The fill is the dtype's lowest finite value, not -inf: exp() of it is exactly 0, and a row
    whose candidates are all hits still has a finite logsumexp, so its backward is not NaN.
    Done outside autograd on purpose: addmm does not keep its output, and every consumer
    (softplus, log_softmax, the fused normaliser) has a zero derivative there, so gradients are
    exact and backward needs no (N, M) mask. The hits are found as (row, column) pairs by a
    search in the sorted candidates, so only they are written: popular targets put hits in a
    third of the rows at N = 8192, M = 2048 (~21k pairs), and copying those rows took 22 ms on
    one core where this takes 2.
    """
    sorted_candidates, order = candidates.sort()
    first = torch.searchsorted(sorted_candidates, targets)                          # (N,)
    count = torch.searchsorted(sorted_candidates, targets, right=True) - first      # hits per row
    rows = torch.repeat_interleave(count)                                          # (P,)
    # The k-th hit of row i is sorted column first[i] + k.
    rank = torch.arange(len(rows), device=rows.device) - (count.cumsum(0) - count)[rows]
    logits[rows, order[first[rows] + rank]] = torch.finfo(logits.dtype).min


def _floored(log_q: torch.Tensor) -> torch.Tensor:
    """log_q with -inf replaced by its smallest finite value."""
    finite = torch.isfinite(log_q)
    return torch.where(finite, log_q, log_q[finite].min())
