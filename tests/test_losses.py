import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dist_rec.config import EVENT_TYPES, SamplerConfig
from dist_rec.embeddings.table import ItemTables
from dist_rec.losses import (FullSoftmax, SampledLoss, _drop_hits_, binary_cross_entropy, bpr_max,
                             build_loss, event_weights, full_softmax, sampled_softmax)

C, D, N = 40, 6, 12  # 40 items (rows 1..40), row 0 padding


def make_tables(seed: int = 0, num_items: int = C, dim: int = D) -> ItemTables:
    torch.manual_seed(seed)
    tables = ItemTables(num_items, dim, dim)
    with torch.no_grad():
        tables.output.weight.normal_()
        tables.bias.weight.normal_()
    return tables


def loss_and_grads(loss_fn, hidden: torch.Tensor, tables: ItemTables):
    """-> loss, d/d hidden, d/d output table (dense), d/d bias (dense)."""
    tables.zero_grad(set_to_none=True)
    hidden = hidden.clone().requires_grad_()
    loss = loss_fn(hidden)
    loss.backward()
    dense = [p.grad.to_dense() if p.grad.is_sparse else p.grad
             for p in (tables.output.weight, tables.bias.weight)]
    return loss.detach(), hidden.grad, *dense


def batch(tables: ItemTables, seed: int = 1):
    """hidden (N, D) near the targets' output vectors, so targets are likely (as after training)
    and the target's own term in the normaliser matters; targets (N,) with a repeat."""
    generator = torch.Generator().manual_seed(seed)
    targets = torch.randint(1, C + 1, (N,), generator=generator)
    targets[1] = targets[0]
    hidden = tables.output.weight[targets].detach() + 0.3 * torch.randn(N, D, generator=generator)
    return hidden, targets


@pytest.mark.parametrize("copies", [1, 3])
@pytest.mark.parametrize("rewards", [False, True])
def test_every_item_sampled_equally_often_is_the_full_softmax(copies, rewards):
    """Each item drawn exactly `copies` times, q uniform: log(K q) = log(copies).

    The sampled loss must equal the full one. Without the accidental-hit mask the target would
    count 1 + copies times; with the correction's sign flipped the negatives would weigh
    copies^2 instead of 1; with the target corrected too (copies = 3) its weight would be 1/3.
    """
    tables = make_tables()
    hidden, targets = batch(tables)
    weights = torch.rand(N, generator=torch.Generator().manual_seed(2)) if rewards else None
    generator = torch.Generator().manual_seed(3)
    negatives = torch.cat([torch.randperm(C, generator=generator) + 1 for _ in range(copies)])
    correction = torch.full((negatives.numel(),), math.log(negatives.numel() / C))
    sampled = loss_and_grads(lambda h: sampled_softmax(h, targets, tables, negatives, correction,
                                                       weights), hidden, tables)
    full = loss_and_grads(lambda h: full_softmax(h, targets, tables, weights), hidden, tables)
    for got, want in zip(sampled, full):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # What the usual mistakes would give instead, from the full logits: each is far outside
    # the tolerance above (copies = 1 cannot see the sign, copies = 3 can).
    logits = torch.addmm(tables.bias.weight[1:, 0], hidden, tables.output.weight[1:].t()).detach()
    target = logits.gather(1, (targets - 1).unsqueeze(1)).squeeze(1)
    rest = logits.scatter(1, (targets - 1).unsqueeze(1), float("-inf")).logsumexp(1)
    shift = math.log(copies)
    mistakes = {"no hit mask": torch.logaddexp(logits.logsumexp(1), target) - target}
    if copies > 1:
        mistakes["flipped sign"] = torch.logaddexp(target, rest + 2 * shift) - target
        mistakes["target corrected"] = torch.logaddexp(target - shift, rest) - (target - shift)
    for name, per_row in mistakes.items():
        assert abs(per_row.mean().item() - full_softmax(hidden, targets, tables).item()) > 0.05, name


def test_full_softmax_matches_cross_entropy_and_ignores_padding_row():
    tables = make_tables()
    hidden, targets = batch(tables)
    with torch.no_grad():
        tables.output.weight[0] = 100.0  # a huge padding score must not enter the normaliser
    logits = hidden @ tables.output.weight[1:].t() + tables.bias.weight[1:, 0]
    want = F.cross_entropy(logits, targets - 1)
    torch.testing.assert_close(full_softmax(hidden, targets, tables), want)
    torch.testing.assert_close(FullSoftmax()(hidden, targets, tables, None, None), want)


def reference_sampled(hidden, targets, tables, negatives, correction, in_batch_correction=None):
    """Row by row, straight from the definition: candidates = target (uncorrected) + negatives
    != target (logit - correction) [+ other rows' targets != target (logit - their correction)]."""
    weight, bias = tables.output_weight()
    losses = []
    for i in range(len(targets)):
        scores = weight @ hidden[i] + bias
        keep = negatives != targets[i]
        candidates = [scores[targets[i]].reshape(1), scores[negatives[keep]] - correction[keep]]
        if in_batch_correction is not None:
            others = targets != targets[i]
            candidates.append(scores[targets[others]] - in_batch_correction[others])
        losses.append(torch.logsumexp(torch.cat(candidates), 0) - scores[targets[i]])
    return torch.stack(losses).mean()


def test_accidental_hits_and_non_uniform_correction_against_the_definition():
    tables = make_tables()
    hidden, targets = batch(tables)
    generator = torch.Generator().manual_seed(4)
    negatives = torch.cat([targets[:3], targets[:1], torch.randint(1, C + 1, (20,), generator=generator)])
    correction = torch.randn(negatives.numel(), generator=generator)
    got = loss_and_grads(lambda h: sampled_softmax(h, targets, tables, negatives, correction),
                         hidden, tables)
    want = loss_and_grads(lambda h: reference_sampled(h, targets, tables, negatives, correction),
                          hidden, tables)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # A row whose only negatives are hits: the loss is 0 and every gradient finite.
    lonely = loss_and_grads(lambda h: sampled_softmax(h, targets[:1], tables, targets[:1].repeat(3),
                                                      torch.zeros(3)), hidden[:1], tables)
    assert lonely[0].item() == 0.0 and all(torch.isfinite(g).all() for g in lonely[1:])


def test_fused_normaliser_passes_gradcheck_in_double():
    tables = make_tables().double()
    hidden, targets = batch(tables)
    negatives = torch.cat([targets[:2], torch.arange(1, 9)])
    correction = torch.linspace(-1, 1, negatives.numel(), dtype=torch.float64)
    weights = torch.linspace(0.2, 1.0, N, dtype=torch.float64)
    in_batch = torch.linspace(0.5, -0.5, N, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda h: sampled_softmax(h, targets, tables, negatives, correction, weights, in_batch),
        hidden.double().requires_grad_())


def test_in_batch_negatives_against_the_definition_and_mixture_correction():
    tables = make_tables()
    hidden, targets = batch(tables)
    counts = np.r_[0, np.arange(1, C + 1) ** 2.0]
    loss = SampledLoss("sampled_softmax", counts, num_negatives=16, alpha=0.5, in_batch=True)
    negatives = loss.sampler.sample(16, torch.Generator().manual_seed(5))
    in_batch = loss.correction(targets, N)
    got = loss_and_grads(lambda h: sampled_softmax(h, targets, tables, negatives,
                                                   loss.correction(negatives, N), None, in_batch),
                         hidden, tables)
    want = loss_and_grads(lambda h: reference_sampled(h, targets, tables, negatives,
                                                      loss.correction(negatives, N), in_batch),
                          hidden, tables)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # Expected count of item 7 among a row's candidates: K q_7 + (N - 1) p_7.
    q7 = 7.0 / np.arange(1, C + 1).sum()                         # count^0.5 = id
    p7 = 49.0 / (np.arange(1, C + 1) ** 2.0).sum()
    assert math.isclose(loss.correction(torch.tensor([7]), N).item(), math.log(16 * q7 + 11 * p7),
                        rel_tol=1e-5)
    # The call path draws from the generator and gives the same value as above.
    value = loss(hidden, targets, tables, None, torch.Generator().manual_seed(5))
    torch.testing.assert_close(value, got[0])


def test_padding_and_never_drawn_items_in_the_log_q_tables():
    """Row 0 is padding whatever its count; an item of count 0 (new, or filtered) is never drawn,
    and as an in-batch candidate gets the rarest drawable item's q, so its logit stays finite."""
    loss = SampledLoss("sampled_softmax", np.array([5.0, 1.0, 3.0, 0.0]), num_negatives=4,
                       alpha=1.0, in_batch=True)
    draws = loss.sampler.sample(4_000, torch.Generator().manual_seed(0))
    assert set(draws.tolist()) == {1, 2}
    # q = count / 4 over items 1..2 (the sampler's) and the data's; rows 0 and 3 floored to 1/4.
    np.testing.assert_allclose(loss.log_q.exp().numpy(), [0.25, 0.25, 0.75, 0.25], rtol=1e-6)
    np.testing.assert_allclose(loss.log_data_q.exp().numpy(), [0.25, 0.25, 0.75, 0.25], rtol=1e-6)
    # Expected count among a row's candidates, K = 4 draws and N - 1 = 2 other targets:
    # item 3: 4 * 1/4 + 2 * 1/4 = 1.5; item 2: 4 * 3/4 + 2 * 3/4 = 4.5.
    np.testing.assert_allclose(loss.correction(torch.tensor([3, 2]), 3).exp().numpy(), [1.5, 4.5],
                               rtol=1e-6)


def test_workspace_is_reused_only_once_the_graph_that_saved_it_is_gone():
    """Forwards whose graphs are alive get their own buffers, so gradients are exact whether
    graphs are backpropagated one by one, together, or twice (retain_graph)."""
    tables = make_tables()
    hidden, targets = batch(tables)
    loss = SampledLoss("sampled_softmax", np.r_[0, np.ones(C)], num_negatives=16)

    def value(h, seed):
        return loss(h, targets, tables, None, torch.Generator().manual_seed(seed))

    alone = [loss_and_grads(lambda h: value(h, seed), hidden, tables) for seed in (1, 2)]
    together = loss_and_grads(lambda h: value(h, 1) + value(h, 2), hidden, tables)
    for a, b, both in zip(*alone, together):
        torch.testing.assert_close(a + b, both)

    first = value(hidden.clone().requires_grad_(), 1)
    first.backward(retain_graph=True)
    value(hidden, 2)                                    # would take the buffer if it were free
    tables.zero_grad(set_to_none=True)
    first.backward()
    torch.testing.assert_close(tables.output.weight.grad.to_dense(), alone[0][2])
    del first                                           # graph gone: the buffer comes back
    address = [loss.workspace.take("negatives", N, 16, hidden)[0].data_ptr() for _ in range(2)]
    assert address[0] == address[1]


def test_accidental_hits_dropped_exactly_with_repeats_on_both_sides():
    targets = torch.tensor([3, 5, 3, 9, 1, 5, 5])
    candidates = torch.tensor([5, 2, 3, 5, 7, 3, 5, 8])
    logits = torch.zeros(len(targets), len(candidates))
    _drop_hits_(logits, targets, candidates)
    hits = targets.unsqueeze(1) == candidates
    assert torch.equal(logits == torch.finfo(logits.dtype).min, hits)


@pytest.fixture
def one_thread():
    """Hundreds of tiny ops: on a busy 2-core machine threading only adds overhead."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def target_corrected_too(hidden, targets, tables, negatives, correction, target_correction):
    """The TensorFlow convention, for comparison: the target's logit is corrected as well."""
    weight, bias = tables.output_weight()
    positive = (hidden * weight[targets]).sum(1) + bias[targets] - target_correction
    logits = hidden @ weight[negatives].t() + bias[negatives] - correction
    logits = logits.masked_fill(targets.unsqueeze(1) == negatives, float("-inf"))
    return (torch.logsumexp(torch.cat([positive.unsqueeze(1), logits], 1), 1) - positive).mean()


def test_log_q_correction_makes_the_expected_gradient_the_full_one(one_thread):
    """Monte Carlo over 300 draws of K = 4096 negatives from a Zipf q on 30 items.

    hidden is near the targets' vectors (target probabilities 0.06..0.78, as after training).
    Tolerance: the mean gradient w.r.t. hidden is within 3% (relative L2) of the full softmax
    gradient with the correction (measured 1.0%; at K = 1024 the finite-K bias is ~2%). Without
    any correction the error is 141%; correcting the target's logit too (TensorFlow's convention)
    leaves 56%: that estimator tends to a different objective as K grows unless K q_target = 1.
    """
    num_items, rows, draws, k = 30, 8, 300, 4096
    tables = make_tables(seed=6, num_items=num_items, dim=4)
    with torch.no_grad():
        tables.bias.weight.zero_()
    generator = torch.Generator().manual_seed(7)
    targets = torch.randint(1, num_items + 1, (rows,), generator=generator)
    hidden = tables.output.weight[targets].detach() + 0.3 * torch.randn(rows, 4, generator=generator)
    loss = SampledLoss("sampled_softmax", np.r_[0, 1000 / np.arange(1, num_items + 1) ** 1.2],
                       num_negatives=k, alpha=1.0)
    q = loss.sampler.log_q.exp()
    assert q[1] / q[num_items] > 50  # strongly non-uniform

    def gradient(loss_fn, *args):
        h = hidden.clone().requires_grad_()
        loss_fn(h, targets, tables, *args).backward()
        return h.grad

    full = gradient(full_softmax)
    sums = {name: torch.zeros_like(full) for name in ("corrected", "uncorrected", "target too")}
    for _ in range(draws):
        negatives = loss.sampler.sample(k, generator)
        correction = loss.correction(negatives, rows)
        sums["corrected"] += gradient(sampled_softmax, negatives, correction)
        sums["uncorrected"] += gradient(sampled_softmax, negatives, torch.zeros(k))
        sums["target too"] += gradient(target_corrected_too, negatives, correction,
                                       loss.correction(targets, rows))
    error = {name: ((total / draws - full).norm() / full.norm()).item() for name, total in sums.items()}
    assert error["corrected"] < 0.03
    assert error["uncorrected"] > 0.5
    assert error["target too"] > 0.2


def test_event_weights_one_against_all_hand_computed():
    # items 1 = (1, 0), 2 = (0, 1), 3 = (1, 1), no bias; hidden rows (1, 0) and (0, 1)
    tables = ItemTables(3, 2, 2)
    with torch.no_grad():
        tables.output.weight.copy_(torch.tensor([[0.0, 0], [1, 0], [0, 1], [1, 1]]))
        tables.bias.weight.zero_()
    hidden = torch.tensor([[1.0, 0], [0, 1]])
    targets = torch.tensor([1, 2])                     # both score 1; normaliser log(2e + 1)
    codes = torch.tensor([4, 1])                        # a buy and a page view
    weights = event_weights(codes, EVENT_TYPES, {"buy": 1.0, "pv": 0.5})
    assert weights.tolist() == [1.0, 0.5]
    want = math.log(2 * math.e + 1) - (1.0 * 1 + 0.5 * 1) / 2
    assert math.isclose(full_softmax(hidden, targets, tables, weights).item(), want, rel_tol=1e-6)
    # The same form in the sampled loss: all items once, q uniform (correction 0).
    sampled = sampled_softmax(hidden, targets, tables, torch.tensor([3, 1, 2]), torch.zeros(3), weights)
    assert math.isclose(sampled.item(), want, rel_tol=1e-6)


def test_event_weights_helper():
    codes = torch.tensor([4, 1, 2, 3, 0])
    weights = event_weights(codes, EVENT_TYPES, {"buy": 1.0, "cart": 0.75, "pv": 0.25})
    assert weights.tolist() == [1.0, 0.25, 0.75, 1.0, 0.0]  # fav unmapped -> 1, padding -> 0
    assert event_weights(codes, EVENT_TYPES, {}) is None
    with pytest.raises(ValueError, match=r"unknown event type\(s\) \['click'\]"):
        event_weights(codes, EVENT_TYPES, {"click": 1.0})
    with pytest.raises(ValueError, match="finite and >= 0"):
        event_weights(codes, EVENT_TYPES, {"pv": -1.0})


def tiny_tables() -> ItemTables:
    """1-d vectors: item 1 = 1, item 2 = 0, item 3 = 2; no bias. With hidden (1,) the scores
    are r_1 = 1, r_2 = 0, r_3 = 2."""
    tables = ItemTables(3, 1, 1)
    with torch.no_grad():
        tables.output.weight.copy_(torch.tensor([[0.0], [1], [0], [2]]))
        tables.bias.weight.zero_()
    return tables


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_bpr_max_hand_computed():
    tables, hidden, targets = tiny_tables(), torch.tensor([[1.0]]), torch.tensor([1])
    s2, s3 = 1 / (1 + math.e ** 2), math.e ** 2 / (1 + math.e ** 2)   # softmax over r = (0, 2)
    ranking = -math.log(s2 * sigmoid(1 - 0) + s3 * sigmoid(1 - 2))
    penalty = s2 * 0 ** 2 + s3 * 2 ** 2
    for negatives in ([2, 3], [2, 1, 3, 1]):          # the hits on item 1 are dropped
        got = bpr_max(hidden, targets, tables, torch.tensor(negatives), regularization=0.5)
        assert math.isclose(got.item(), ranking + 0.5 * penalty, rel_tol=1e-6)
    weighted = bpr_max(hidden, targets, tables, torch.tensor([2, 3]), torch.tensor([0.3]), 0.5)
    assert math.isclose(weighted.item(), 0.3 * ranking + 0.5 * penalty, rel_tol=1e-6)
    h = hidden.clone().requires_grad_()
    only_hits = bpr_max(h, targets, tables, torch.tensor([1, 1]))
    only_hits.backward()
    assert only_hits.item() == 0.0 and torch.isfinite(h.grad).all()


def test_bce_hand_computed():
    tables, hidden, targets = tiny_tables(), torch.tensor([[1.0]]), torch.tensor([1])
    want = softplus(-1) + softplus(0) + softplus(2)   # -log s(1) - log(1 - s(0)) - log(1 - s(2))
    got = binary_cross_entropy(hidden, targets, tables, torch.tensor([2, 1, 3]))
    assert math.isclose(got.item(), want, rel_tol=1e-6)
    weighted = binary_cross_entropy(hidden, targets, tables, torch.tensor([2, 3]), torch.tensor([2.0]))
    assert math.isclose(weighted.item(), 2 * softplus(-1) + softplus(0) + softplus(2), rel_tol=1e-6)


def test_build_loss_and_shared_negatives():
    counts = np.r_[5, np.arange(1, C + 1)]
    assert isinstance(build_loss(SamplerConfig(loss="full_softmax"), counts), FullSoftmax)
    tables = make_tables()
    hidden, targets = batch(tables)
    for name in ("sampled_softmax", "bpr_max", "bce"):
        loss = build_loss(SamplerConfig(loss=name, num_negatives=8), counts)
        first = loss(hidden, targets, tables, None, torch.Generator().manual_seed(9))
        again = loss(hidden, targets, tables, None, torch.Generator().manual_seed(9))
        assert torch.isfinite(first) and torch.equal(first, again)  # same seed, same negatives
    # BPR-max's lambda comes from the config: a stronger regulariser, a larger loss.
    plain, regularized = (build_loss(SamplerConfig(loss="bpr_max", num_negatives=8,
                                                   bpr_regularization=lam), counts)
                          (hidden, targets, tables, None, torch.Generator().manual_seed(9))
                          for lam in (0.0, 2.0))
    assert regularized > plain
    with pytest.raises(ValueError, match="unknown loss 'hinge'"):
        build_loss(SamplerConfig(loss="hinge"), counts)
    with pytest.raises(ValueError, match="num_negatives must be >= 1"):
        build_loss(SamplerConfig(num_negatives=0), counts)
    with pytest.raises(ValueError, match="in_batch_negatives needs loss='sampled_softmax'"):
        build_loss(SamplerConfig(loss="bce", in_batch_negatives=True), counts)


def test_unseen_target_and_count_updates():
    counts = np.r_[0, np.ones(C)]
    counts[5] = 0                                       # item 5 is never drawn
    loss = SampledLoss("sampled_softmax", counts, num_negatives=8, in_batch=True)
    tables = make_tables()
    hidden, targets = batch(tables)
    targets[2] = 5
    value = loss(hidden, targets, tables, None, torch.Generator().manual_seed(1))
    assert torch.isfinite(value)
    assert torch.isfinite(loss.correction(targets, N)).all()
    loss.update_counts(np.r_[counts, 3.0])              # the catalog grew by one item
    assert loss.sampler.num_items == C + 2 and loss.log_q.shape == (C + 2,)
