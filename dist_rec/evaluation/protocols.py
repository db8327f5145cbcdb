"""Evaluation protocols of the papers we compare with, over any `Ranker`, in batches.

A `Ranker` scores the catalog for the LAST position of each row of a left-padded SequenceBatch
(the prediction for the batch's `now`). `ModelRanker` adapts a NextItemModel; popularity baselines
implement the same methods. Every protocol is a function that returns a dict of floats, "count"
being the number of test events (or users) averaged over.

Inputs: sessions are lists of 1-D arrays of dense item ids (0 = padding, stripped), e.g. the rows
of a left-padded session file. User histories are a `Histories` or a pyarrow Table with list
columns user / items / timestamps / event_types (the output of data.sequences.build_histories;
timestamps and event_types may be absent: zeros and type 1 then; values and contexts, when the
table has them, reach the model as in training, the request's context being that of the event
predicted, or of the first one of a multi-event ground truth).
"""
from __future__ import annotations

import itertools
import logging
import math
from contextlib import contextmanager
from typing import Iterator, Protocol, Sequence

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence
from tqdm.auto import tqdm

from dist_rec.batch import SequenceBatch
from dist_rec.config import DataConfig
from dist_rec.data.sequences import history_batch
from dist_rec.data.vocab import UNKNOWN_ITEM
from dist_rec.evaluation.histories import Histories, as_histories
from dist_rec.evaluation.metrics import (NEVER_RANKED, multi_target_precision_recall,
                                         perplexity, rank_metrics)

log = logging.getLogger(__name__)


class Ranker(Protocol):
    """Scores items for the last position of every row of a batch (B rows, C candidates).

    Optional, for causal scorers: `step_ranks(batch) -> (B, T)` int64, the full-catalog rank of
    `batch.targets` at every position of `batch.mask` (-1 elsewhere), from one pass. Optional, for
    rankers with a softmax over the catalog (perplexity): `target_log_likelihoods(batch, targets)
    -> (B,)` float64 and, beside `step_ranks`, `step_log_likelihoods(batch) -> (B, T)` (NaN off
    the mask): the targets' log-probabilities. ModelRanker reads the scores as softmax logits,
    which is what the full and the log-Q-corrected sampled softmax train; a model trained with
    BCE or BPR-max scores on another scale, and its perplexity is no likelihood of its own.
    """

    num_items: int  # dense ids 1..num_items

    def topk(self, batch: SequenceBatch, k: int, exclude: torch.Tensor | None = None
             ) -> torch.Tensor:
        """-> (B, k) int64 item ids, best first; `exclude` (B, M) ids (0 = none) never returned."""

    def target_ranks(self, batch: SequenceBatch, targets: torch.Tensor,
                     exclude: torch.Tensor | None = None) -> torch.Tensor:
        """targets (B,) -> (B,) int64 0-based full-catalog ranks; ties count against the target;
        `exclude` (B, M) ids (0 = none) do not compete (the target always counts as itself)."""

    def candidate_scores(self, batch: SequenceBatch, candidates: torch.Tensor) -> torch.Tensor:
        """candidates (B, C) item ids -> (B, C) float scores."""


@contextmanager
def _inference(model: torch.nn.Module) -> Iterator[None]:
    """eval() and no_grad() for the duration, then the model's own mode back (e.g. training)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


class ModelRanker:
    """`Ranker` for a NextItemModel: hidden[:, -1] against the item tables, full catalog."""

    def __init__(self, model: torch.nn.Module, rows_per_call: int = 256):
        self.model = model
        self.device = next(model.parameters()).device
        self.num_items = model.tables.num_items
        self.rows_per_call = rows_per_call  # step_ranks: positions ranked per call (score buffer rows)

    @property
    def max_length(self) -> int | None:
        """The longest input the encoder reads (learned positions), None = any."""
        return self.model.max_length

    @property
    def unreadable_items(self) -> torch.Tensor | None:
        """(N + 1,) bool: items whose events the protocols leave out of the histories this
        ranker reads (NextItemModel.unreadable_items), or None."""
        return self.model.unreadable_items

    def _last_hidden(self, batch: SequenceBatch) -> torch.Tensor:
        limit = self.max_length
        if limit is not None and batch.items.shape[1] > limit:
            # An encoder with learned positions reads its last `limit` steps, as its training
            # windows did; a protocol's longer histories would be out of its range.
            batch = batch.steps(slice(-limit, None))
        return self.model.hidden(batch.to(self.device))[:, -1]            # (B, D)

    def topk(self, batch, k, exclude=None):
        with _inference(self.model):
            exclude = None if exclude is None else exclude.to(self.device)
            return self.model.scorer.topk(self._last_hidden(batch), k, exclude=exclude)[1].cpu()

    def target_ranks(self, batch, targets, exclude=None):
        with _inference(self.model):
            hidden = self._last_hidden(batch)
            exclude = None if exclude is None else exclude.to(self.device)
            return self.model.scorer.target_ranks(hidden, targets.to(self.device),
                                                  exclude=exclude).cpu()

    def candidate_scores(self, batch, candidates):
        with _inference(self.model):
            hidden = self._last_hidden(batch)
            weight, bias = self.model.scorer.output_rows(candidates.to(self.device))
            # Elementwise product + sum, not bmm: every column is reduced the same way, so a
            # candidate identical to the target ties with it exactly.
            return ((weight * hidden.unsqueeze(1)).sum(-1) + bias).cpu()

    def target_log_likelihoods(self, batch, targets):
        with _inference(self.model):
            return self.model.scorer.target_log_likelihoods(self._last_hidden(batch),
                                                            targets.to(self.device)).cpu()

    def step_ranks(self, batch):
        return self._every_step(batch, self.model.scorer.target_ranks, -1, torch.int64)

    def step_log_likelihoods(self, batch):
        return self._every_step(batch, self.model.scorer.target_log_likelihoods, math.nan,
                                torch.float64)

    def _every_step(self, batch, measure, fill, dtype) -> torch.Tensor:
        """`measure(hidden, targets)` of the scorer at every position of `batch.mask`, in calls of
        rows_per_call positions -> (B, T) of `dtype`, `fill` off the mask. One process: on
        sharded tables the ranks would make different numbers of collective calls."""
        with _inference(self.model):
            batch = batch.to(self.device)
            mask = batch.mask
            hidden, targets = self.model.hidden(batch)[mask], batch.targets[mask]  # (N, D), (N,)
            out = torch.full(mask.shape, fill, dtype=dtype, device=self.device)
            out[mask] = torch.cat([
                measure(hidden[i:i + self.rows_per_call], targets[i:i + self.rows_per_call])
                for i in range(0, len(targets), self.rows_per_call)] or [out[mask]])
            return out.cpu()


def _sample_rows(rows: np.ndarray, count: int | None, rng: np.random.Generator) -> np.ndarray:
    """`count` of `rows` uniformly without replacement (all when fewer or count is None), sorted."""
    if count is None or len(rows) <= count:
        return rows
    return np.sort(rng.choice(rows, count, replace=False))


def _batches(inputs: Histories, now: np.ndarray, max_length: int | None, data_config: DataConfig,
             batch_size: int, progress: bool, desc: str, now_contexts: np.ndarray | None = None,
             reader=None) -> Iterator[tuple[np.ndarray, SequenceBatch]]:
    """(rows, batch) over `inputs`: rows (B,) are indices into `inputs`, the batch holds each of
    those users' last `max_length` events (None: all), right-aligned; now (U,) is the prediction
    time of each row's last position and now_contexts (U,) its request context (when the
    histories carry contexts). Users go in order of history length, so a batch pads only to
    its own longest row (every encoder is padding-invariant, tested): on Amazon's histories
    (mean 9 events, cut at 50) a batch of 256 random users is 50 wide almost always. Events on
    unknown items are left out: no model has a row for them; so are those on items the ranker
    or model `reader` says it cannot read (`unreadable_items`: a plain model's cold items)."""
    unreadable = getattr(reader, "unreadable_items", None)
    inputs = inputs.without_unknown_items(None if unreadable is None
                                          else unreadable.cpu().numpy())
    lengths = inputs.lengths()
    order = np.argsort(lengths, kind="stable")
    pick = lambda lists, rows: None if lists is None else [lists[r] for r in rows]  # noqa: E731
    for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress):
        rows = order[start:start + batch_size]
        width = max(int(lengths[rows].max()), 1)      # a user may have no known input event
        width = width if max_length is None else min(width, max_length)
        # Whole histories go in: history_batch keeps the last `width` events itself and sees
        # the predecessor of the first kept one (its session-start bit).
        yield rows, history_batch(pick(inputs.items, rows), pick(inputs.timestamps, rows),
                                  pick(inputs.event_types, rows), now[rows], data_config, width,
                                  users=inputs.users[rows], values=pick(inputs.values, rows),
                                  contexts=pick(inputs.contexts, rows),
                                  now_contexts=None if now_contexts is None else now_contexts[rows])


def _sessions(sessions: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Sessions with padding zeros removed and fewer than 2 items dropped."""
    out = [s[s > 0] for s in map(lambda s: np.asarray(s, np.int64), sessions)]
    kept = [s for s in out if len(s) >= 2]
    if not kept:
        raise ValueError("sessions: none has 2+ items")
    if len(kept) < len(out):
        log.info("%d sessions with fewer than 2 items skipped", len(out) - len(kept))
    return kept


def _session_targets(ranker: Ranker, inputs: Histories, targets: np.ndarray, max_length,
                     data_config, batch_size, progress, desc, perplexity: bool = True
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The targets' full-catalog ranks (N,) and, if asked and the ranker gives them,
    log-likelihoods (N,)."""
    now = np.zeros(len(inputs), np.int64)  # sessions carry no time: every delta is bucket(0)
    targets = torch.as_tensor(targets, dtype=torch.int64)
    likelihoods = getattr(ranker, "target_log_likelihoods", None) if perplexity else None
    ranks, logs = [], []
    for rows, batch in _batches(inputs, now, max_length, data_config, batch_size, progress, desc,
                                reader=ranker):
        ranks.append(ranker.target_ranks(batch, targets[rows]))
        if likelihoods is not None:
            logs.append(likelihoods(batch, targets[rows]))
    return torch.cat(ranks), torch.cat(logs) if likelihoods is not None else None


def _perplexity(log_likelihoods: torch.Tensor | None, name: str = "perplexity") -> dict[str, float]:
    """{name: exp(-mean log-likelihood)}, or nothing for a ranker without a softmax. Targets of
    log-likelihood -inf are left out, as unknown items are: the cold items a model leaves out
    of its rankings (NextItemModel.set_cold_items), to which it gives no probability."""
    if log_likelihoods is None:
        return {}
    scored = log_likelihoods[~torch.isneginf(log_likelihoods)]
    return {name: perplexity(scored.mean().item()) if len(scored) else math.nan}


def session_last_item(ranker: Ranker, sessions: Sequence[np.ndarray], ks: Sequence[int] = (10, 20),
                      max_length: int = 30, batch_size: int = 256,
                      data_config: DataConfig | None = None, progress: bool = True,
                      perplexity: bool = True) -> dict[str, float]:
    """Last item of each session, full ranking (DynamicRec, CIKM 2020).

    Rules: per session with 2+ items, input = all items but the last, keeping the last
    `max_length` right-aligned (the paper: 10 on YooChoose and Diginetica, 30 on LastFM and
    NowPlaying); target = the last item; the target is ranked among ALL items,
    items seen in the session are NOT excluded, ties count against the target. Sessions carry no
    time: timestamps and `now` are 0, event types 1. Returns hr@k, ndcg@k (1/log2(rank+2)),
    mrr@k for every k, averaged over sessions, and count; and perplexity, exp(-mean log p(target))
    under the softmax over all items, for a ranker that has one (`target_log_likelihoods`; a
    target it gives no probability, a plain model's cold item, is left out of the mean;
    `perplexity=False` skips that second pass over the catalog, e.g. for model selection).
    """
    kept = _sessions(sessions)
    inputs = Histories.from_items([s[:-1] for s in kept])
    ranks, logs = _session_targets(ranker, inputs, np.array([s[-1] for s in kept], np.int64),
                                   max_length, data_config or DataConfig(), batch_size, progress,
                                   "session last item", perplexity)
    return {**rank_metrics(ranks, ks), **_perplexity(logs), "count": float(len(ranks))}


def session_every_position(ranker: Ranker, sessions: Sequence[np.ndarray],
                           ks: Sequence[int] = (20,), max_length: int | None = None,
                           batch_size: int = 256, data_config: DataConfig | None = None,
                           progress: bool = True) -> dict[str, float]:
    """Every next item of each session, full ranking (GRU4Rec, ICLR 2016).

    Rules: for a session x_1..x_n (n >= 2), the n-1 events x_{t+1}, t = 1..n-1, are each predicted
    from the prefix x_1..x_t alone (the state starts from zero per session; input truncated to the
    last `max_length` items, None = whole prefix); rank among ALL items, ties against the target.
    recall@k and mrr@k are averaged over events, not sessions. A ranker with `step_ranks` (causal)
    ranks every prefix of a session in one pass over the whole session; otherwise every prefix is
    its own row. A ranker whose encoder reads at most `ranker.max_length` steps (SASRec's and
    ConvRec's learned positions) reads each prefix's last max_length items when a session is longer.
    perplexity (over events), as in `session_last_item`, for a ranker with a softmax.
    """
    data_config = data_config or DataConfig()
    kept = _sessions(sessions)
    limit = getattr(ranker, "max_length", None)
    if max_length is None and limit is not None and any(len(s) > limit for s in kept):
        max_length = limit
    step_ranks = getattr(ranker, "step_ranks", None)
    if (step_ranks is None or max_length is not None
            or getattr(ranker, "unreadable_items", None) is not None):
        # One pass would let late positions see more than max_length items, and its targets are
        # its inputs: events the ranker cannot read would go as targets too. A row per prefix.
        inputs = Histories.from_items([s[:t] for s in kept for t in range(1, len(s))])
        targets = np.array([x for s in kept for x in s[1:]], np.int64)
        ranks, logs = _session_targets(ranker, inputs, targets, max_length, data_config,
                                       batch_size, progress, "session prefixes")
    else:
        # history_batch sets targets[t] = items[t+1]: the mask marks the n-1 predictions.
        batches = _batches(Histories.from_items(kept), np.zeros(len(kept), np.int64), None,
                           data_config, batch_size, progress, "session steps", reader=ranker)
        step_likelihoods = getattr(ranker, "step_log_likelihoods", None)
        ranks, logs = [], []
        for _, batch in batches:
            ranks.append(step_ranks(batch)[batch.mask])
            if step_likelihoods is not None:
                logs.append(step_likelihoods(batch)[batch.mask])
        ranks, logs = torch.cat(ranks), torch.cat(logs) if step_likelihoods is not None else None
    return {**rank_metrics(ranks, ks, ("recall", "mrr")), **_perplexity(logs),
            "count": float(len(ranks))}


def next_value_rmse(model: torch.nn.Module, histories, max_length: int = 100,
                    batch_size: int = 256, data_config: DataConfig | None = None,
                    progress: bool = False) -> dict[str, float]:
    """Root mean squared error of a value head's prediction of each next event's value
    (HRNN-meta, KDD 2020, sec. 4.3, Tables 4-5).

    Rules: histories with values (a table from build_histories with DataConfig.carry_values);
    each user's last `max_length` known-item events, every event after the first predicted from
    the events before it (and from the event's item, which the value head reads), `now` unused
    (the deltas are the real gaps). Returns rmse (over events) and count (events). `model`: a
    NextItemModel with a value head, or anything with its `hidden` and `predict_values` (e.g.
    models.baselines.RollingAverageValues).
    """
    h = as_histories(histories)
    if h.values is None:
        raise ValueError("next_value_rmse: the histories carry no values "
                         "(prepare with DataConfig.carry_values)")
    device = next(itertools.chain(model.parameters(), model.buffers())).device
    squared, count = 0.0, 0
    with _inference(model):
        for _, batch in _batches(h, np.zeros(len(h), np.int64), max_length,
                                 data_config or DataConfig(), batch_size, progress, "next value",
                                 reader=model):
            batch = batch.to(device)
            mask = batch.mask
            predicted = model.predict_values(model.hidden(batch)[mask], batch.targets[mask])
            squared += (predicted.double() - batch.target_values[mask].double()).pow(2).sum().item()
            count += int(mask.sum())
    if not count:
        raise ValueError("next_value_rmse: no user has 2+ events")
    return {"rmse": math.sqrt(squared / count), "count": float(count)}


def split_leave_one_out(histories) -> tuple[Histories, Histories, Histories]:
    """SASRec's split -> (train, valid, test).

    Users with 3+ events: test = the last event, valid = the second last, train = the rest.
    Users with fewer events: all of them in train, none in valid/test. train keeps every user (in
    the input order); valid and test hold one event for each user with 3+ events, same order.
    """
    h = as_histories(histories)
    n = h.lengths()
    every = np.arange(len(h))
    split = every[n >= 3]
    train = h.slices(every, np.zeros_like(n), np.where(n >= 3, n - 2, n))
    last = n[split]
    return train, h.slices(split, last - 2, last - 1), h.slices(split, last - 1, last)


def _negatives(rng: np.random.Generator, interacted: list[np.ndarray], num_items: int,
               count: int) -> np.ndarray:
    """(U, count) items drawn uniformly, with replacement (as SASRec), among 1..num_items minus
    each user's interacted items (rejection: redraw the rejected ones until none is left)."""
    seen = [np.unique(x) for x in interacted]
    for row, x in enumerate(seen):
        if len(x) and (x[-1] > num_items or x[0] < 1):
            raise ValueError(f"leave-one-out: user row {row} has an item id outside 1..{num_items}")
        if len(x) >= num_items:
            raise ValueError(f"leave-one-out: user row {row} interacted with every item")
    # One sorted key space, user row * (num_items + 1) + item, answers every membership query.
    offsets = np.arange(len(seen), dtype=np.int64)[:, None] * (num_items + 1)
    keys = np.concatenate([x + offsets[row, 0] for row, x in enumerate(seen)])
    draws = rng.integers(1, num_items + 1, size=(len(seen), count))
    while True:
        wanted = draws + offsets
        found = keys[np.searchsorted(keys, wanted).clip(max=len(keys) - 1)] == wanted
        if not found.any():
            return draws
        draws[found] = rng.integers(1, num_items + 1, size=int(found.sum()))


def user_leave_one_out(ranker: Ranker, histories, ks: Sequence[int] = (10,), target: str = "test",
                       num_negatives: int = 100, max_length: int = 50,
                       max_users: int | None = 10_000, seed: int = 0, batch_size: int = 256,
                       data_config: DataConfig | None = None, progress: bool = True,
                       full_ranking: bool = True) -> dict[str, float]:
    """Leave-one-out per user (SASRec, ICDM 2018), sampled and full ranking.

    Rules: users with 3+ events (time order as given); target "test" = the last event with input =
    all earlier events, "valid" = the second last with input = the events before it; input keeps
    the last `max_length` (50), `now` = the target's timestamp. If more than `max_users` users
    qualify, that many are drawn uniformly without replacement (numpy Generator seeded with
    `seed`). (a) sampled: candidates = the target + `num_negatives` (100) items drawn uniformly with
    replacement from the items the user never interacted with up to the target (for "test" every
    item of the user: no seen item is ever a negative; SASRec's own code excludes the training
    items only, so its valid item, 1 in ~23k a draw on Amazon, can be a negative; for "valid" the
    test item, in the target's future, can be one, as in SASRec's code);
    rank = #{negatives scoring >= the target} among the 101. (b) full: rank over the whole
    catalog. (c) full_unseen: rank over the items the user never interacted with up to the target,
    the population (a) samples its negatives from, so items the user already has (which a
    recommender would filter) do not compete. Ties count
    against the target. Returns sampled_, full_ and full_unseen_{hr,ndcg,mrr}@k, averaged over
    users, and count; with (b), full_perplexity, exp(-mean log p(target)) under the softmax over
    all items it ranks, over the targets on known items it gives a probability (not the cold
    items a plain model leaves out), for a ranker that has one. Same seed, same users
    and negatives (whatever the batch size).
    `full_ranking=False` skips (b), (c) and the perplexity, passes over the catalog, for a model
    selection that reads the sampled figures only; (a) is unchanged. A target on an unknown item
    (UNKNOWN_ITEM) is a miss at every k in (a), (b) and (c) (rank NEVER_RANKED); unknown items
    are never inputs or negatives.
    """
    if target not in ("test", "valid"):
        raise ValueError(f"user_leave_one_out: target must be 'test' or 'valid', got {target!r}")
    h = as_histories(histories)
    rng = np.random.default_rng(seed)
    n = h.lengths()
    users = _sample_rows(np.flatnonzero(n >= 3), max_users, rng)
    if not len(users):
        raise ValueError("user_leave_one_out: no user has 3+ events")
    cut = n[users] - (1 if target == "test" else 2)
    inputs = h.slices(users, np.zeros_like(cut), cut)
    goal = h.slices(users, cut, cut + 1)
    targets, now = torch.as_tensor(np.concatenate(goal.items)), np.concatenate(goal.timestamps)
    known = targets != UNKNOWN_ITEM
    targets = torch.where(known, targets, 1)         # scored as item 1, then ranked past the end
    # Up to the target: validation must not know the test item.
    interacted = [h.items[u][:c + 1][h.items[u][:c + 1] != UNKNOWN_ITEM] for u, c in zip(users, cut)]
    negatives = torch.as_tensor(_negatives(rng, interacted, ranker.num_items, num_negatives))
    interacted = pad_sequence([torch.as_tensor(x) for x in interacted], batch_first=True)  # (U, M)
    likelihoods = getattr(ranker, "target_log_likelihoods", None) if full_ranking else None
    sampled, full, unseen, logs = [], [], [], []

    def missed(ranks: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
        return torch.where(known[rows], ranks, NEVER_RANKED)

    for rows, batch in _batches(inputs, now, max_length, data_config or DataConfig(), batch_size,
                                progress, f"leave-one-out {target}", goal.request_contexts(),
                                reader=ranker):
        candidates = torch.cat([targets[rows, None], negatives[rows]], dim=1)   # (B, 1 + K)
        scores = ranker.candidate_scores(batch, candidates)
        sampled.append(missed((scores[:, 1:] >= scores[:, :1]).sum(1), rows))
        if full_ranking:
            full.append(missed(ranker.target_ranks(batch, targets[rows]), rows))
            unseen_ranks = ranker.target_ranks(batch, targets[rows], exclude=interacted[rows])
            unseen.append(missed(unseen_ranks, rows))
        if likelihoods is not None:
            logs.append(likelihoods(batch, targets[rows])[known[rows]])
    out = {**rank_metrics(torch.cat(sampled), ks, prefix="sampled_"), "count": float(len(users))}
    if full_ranking:
        out.update(rank_metrics(torch.cat(full), ks, prefix="full_"))
        out.update(rank_metrics(torch.cat(unseen), ks, prefix="full_unseen_"))
        out.update(_perplexity(torch.cat(logs) if likelihoods is not None else None,
                               "full_perplexity"))
    return out


def _multi_target(ranker: Ranker, inputs: Histories, truth: Histories, cutoffs: Sequence[int],
                  max_length: int, data_config: DataConfig | None, batch_size: int,
                  progress: bool, desc: str) -> dict[str, float]:
    """Each user at the time of its first ground-truth event against its ground truth, for every
    k in `cutoffs` from one pass over the catalog (`_truth_ranks`)."""
    cutoffs = sorted(set(cutoffs))
    k = cutoffs[-1]
    now = np.array([t[0] for t in truth.timestamps], np.int64)
    precision = {c: [] for c in cutoffs}
    recall = {c: [] for c in cutoffs}
    first_ranks = []
    for rows, batch in _batches(inputs, now, max_length, data_config or DataConfig(), batch_size,
                                progress, desc, truth.request_contexts(), reader=ranker):
        expected = pad_sequence([torch.as_tensor(truth.items[r]) for r in rows],
                                batch_first=True)                              # (B, M)
        ranks = _truth_ranks(ranker, batch, expected, k)                       # (B, M)
        for c in cutoffs:
            p, r = multi_target_precision_recall(ranks, expected, c)
            precision[c].append(p)
            recall[c].append(r)
        first_ranks.append(ranks[:, 0])
    if not first_ranks:
        raise ValueError(f"{desc}: no user to evaluate")
    out: dict[str, float] = {}
    for c in cutoffs:
        found = torch.cat(recall[c])
        out.update({f"precision@{c}": torch.cat(precision[c]).mean().item(),
                    f"recall@{c}": found.mean().item(),
                    f"hr@{c}": (found > 0).double().mean().item()})
    out.update(rank_metrics(torch.cat(first_ranks), cutoffs, ("ndcg", "mrr")))
    out["count"] = float(sum(len(r) for r in first_ranks))
    return out


def _truth_ranks(ranker: Ranker, batch: SequenceBatch, truth: torch.Tensor, k: int) -> torch.Tensor:
    """truth (B, M) item ids (0 = padding, negative = unknown) -> (B, M) int64 full-catalog ranks,
    ties against the item, exact below k; k for every item ranked k or lower and for unknown items.

    From the ranker's k + 1 best items: every item that scores at least as much as one above the
    (k + 1)-th best score is among those k + 1, so counting them there gives its rank; one at or
    below that score has k others at least as good. Both sides are scored by candidate_scores, so
    an item scores the same in the list and in the truth, and exact ties are seen as ties.
    """
    top = ranker.topk(batch, k + 1)                                            # (B, k + 1)
    scores = ranker.candidate_scores(batch, torch.cat([top, truth.clamp(min=1)], 1))
    # Empty slots (0) mean a catalog of k items or fewer: then nothing is outside the list.
    listed = scores[:, :k + 1].masked_fill(top == 0, -math.inf).sort(1).values  # ascending
    mine = scores[:, k + 1:]
    at_least = (k + 1) - torch.searchsorted(listed, mine.contiguous())       # listed items >= mine
    inside = (mine > listed[:, :1]) & (truth > 0)
    return torch.where(inside, at_least - 1, k)                               # minus the item itself


def tdm_first_half(ranker: Ranker, histories, k: int = 200, num_users: int | None = 10_000,
                   min_events: int = 10, max_length: int = 100, seed: int = 0,
                   ks: Sequence[int] = (),
                   batch_size: int = 256, data_config: DataConfig | None = None,
                   progress: bool = True) -> dict[str, float]:
    """First half -> second half per user (TDM, KDD 2018; the HRNN paper's Taobao protocol).

    Rules: users with `min_events` (10)+ events; `num_users` (10,000) of them drawn uniformly
    without replacement (numpy Generator seeded with `seed`; all when fewer qualify). Each user's
    events sorted by time (stable); with n events, the first n // 2 are the input (its last
    `max_length` kept) and the other n - n // 2 the ground truth: all behaviour types, duplicates
    kept. `now` = timestamp of the first ground-truth event. Top-k over the full catalog, seen items
    NOT excluded. Events on unknown items (UNKNOWN_ITEM: items only held-out users touched) count
    in n and in the ground truth, where no model can hit them, and are left out of the input.
    Per user, with hits = ground-truth events whose item ranks in the top k, a tie with other
    items counted against it (metrics.multi_target_precision_recall): precision@k = hits / k,
    recall@k = hits / n_truth; hr@k = share of users with a hit; ndcg@k and mrr@k score the
    first ground-truth item at its rank (ties against it).
    All averaged over users; count = users. `ks`: more cutoffs (<= k) reported from the same list.
    """
    if any(c > k for c in ks):
        raise ValueError(f"tdm_first_half: every cutoff in ks={list(ks)} must be <= k={k}")
    h = as_histories(histories)
    users = _sample_rows(np.flatnonzero(h.lengths() >= min_events), num_users,
                         np.random.default_rng(seed))
    h = h.slices(users, np.zeros_like(users), h.lengths()[users]).sorted_by_time()
    n, every = h.lengths(), np.arange(len(users))
    return _multi_target(ranker, h.slices(every, np.zeros_like(n), n // 2),
                         h.slices(every, n // 2, n), (k, *ks), max_length, data_config,
                         batch_size, progress, "tdm first half")


def next_hour(ranker: Ranker, histories, hour_start: int, hour_seconds: int = 3600, k: int = 200,
              max_users: int | None = None, max_length: int = 100, seed: int = 0,
              batch_size: int = 256, data_config: DataConfig | None = None,
              progress: bool = True) -> dict[str, float]:
    """The next hour's events of each active user (frames for hourly retraining).

    Rules: per user (events sorted by time, stable), input = events with timestamp < hour_start
    (last `max_length` kept), ground truth = events in [hour_start, hour_start + hour_seconds), all
    types, duplicates kept; later events are ignored. Users need 1+ event on each side (users with
    no history are skipped: nothing to condition on). Optionally `max_users` of them, drawn with a
    numpy Generator seeded with `seed`. `now` = the first ground-truth timestamp. Metrics as in
    `tdm_first_half`: precision@k, recall@k, hr@k, ndcg@k, mrr@k, count.
    """
    h = as_histories(histories)
    n = h.lengths()
    owner = np.repeat(np.arange(len(h)), n)
    times = np.concatenate(h.timestamps) if len(h) else np.zeros(0, np.int64)
    before = np.bincount(owner, times < hour_start, len(h))
    inside = np.bincount(owner, (times >= hour_start) & (times < hour_start + hour_seconds), len(h))
    users = _sample_rows(np.flatnonzero((before > 0) & (inside > 0)), max_users,
                         np.random.default_rng(seed))
    h = h.slices(users, np.zeros_like(users), n[users]).sorted_by_time()
    every = np.arange(len(users))
    start = before[users].astype(np.int64)
    return _multi_target(ranker, h.slices(every, np.zeros_like(start), start),
                         h.slices(every, start, start + inside[users].astype(np.int64)), (k,),
                         max_length, data_config, batch_size, progress, f"hour {hour_start}")
