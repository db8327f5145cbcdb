"""Caser, ConvRec, DynamicRec and SASRec under the encoder interface: shapes, causality, padding
invariance, gradients (learning a planted rule: test_every_model.py)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from dist_rec.batch import SequenceBatch
from dist_rec.config import ModelConfig
from dist_rec.evaluation.protocols import ModelRanker
from dist_rec.models import Dimensions, build_model
from dist_rec.models import caser, convrec, dynamicrec, sasrec
from dist_rec.models.convrec import LightweightConv
from dist_rec.models.dynamicrec import DynamicConv

NUM_ITEMS = 200
DIMS = Dimensions(num_items=NUM_ITEMS, num_users=10, num_delta_buckets=8, num_event_types=4)

# Tiny settings (small kernels/windows so that short windows exercise every tap).
CASES = {
    "caser": ("caser", {"window": 3, "vertical_filters": 2, "horizontal_filters": 2,
                        "user_dim": 2}),
    "convrec": ("convrec", {"heads": 2, "kernel_size": 3, "max_length": 16}),
    "convrec-residual": ("convrec", {"heads": 2, "kernel_size": 3, "max_length": 16,
                                     "residual": "both", "blocks": 2}),
    "dynamicrec": ("dynamicrec", {"heads": 2, "kernel_size": 3}),
    "sasrec": ("sasrec", {"heads": 2, "max_length": 16}),
    "sasrec-paper": ("sasrec", {"heads": 2, "max_length": 16, "block": "paper"}),
}



def make_batch(items: torch.Tensor, users: torch.Tensor | None = None) -> SequenceBatch:
    """items (B, T) left-padded -> a batch whose targets are the next items (0 at the end)."""
    real = (items > 0).long()
    targets = torch.cat([items[:, 1:], torch.zeros_like(items[:, :1])], dim=1) * real
    users = torch.arange(1, items.shape[0] + 1) % (DIMS.num_users + 1) if users is None else users
    return SequenceBatch(items=items, targets=targets, deltas=real, session_starts=items > 0,
                         event_types=real, target_types=real, users=users)


def build(case: str, embedding_dim: int = 8, hidden_dim: int = 8, tied: bool = True):
    name, options = CASES[case]
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name, embedding_dim=embedding_dim, hidden_dim=hidden_dim,
                                    tied_embeddings=tied, options=options), DIMS)
    return model.eval()


def random_items(rows: int, length: int, real: list[int], seed: int) -> torch.Tensor:
    """(rows, length) random ids, row r left-padded to real[r] real steps."""
    gen = torch.Generator().manual_seed(seed)
    items = torch.randint(1, NUM_ITEMS + 1, (rows, length), generator=gen)
    pad = torch.arange(length) < (length - torch.tensor(real)).unsqueeze(1)
    return items.masked_fill(pad, 0)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("embedding_dim, hidden_dim, tied", [(8, 12, False), (8, 8, True)])
def test_shapes_and_zero_padding(case, embedding_dim, hidden_dim, tied):
    model = build(case, embedding_dim, hidden_dim, tied)
    items = random_items(3, 7, [7, 4, 1], seed=1)
    hidden = model.hidden(make_batch(items))
    assert hidden.shape == (3, 7, hidden_dim)
    assert torch.isfinite(hidden).all()
    assert torch.equal(hidden[items == 0], torch.zeros(int((items == 0).sum()), hidden_dim))
    assert (hidden[items > 0].abs().sum(-1) > 0).all()


@pytest.mark.parametrize("case", CASES)
def test_causal(case):
    model = build(case)
    items = random_items(3, 8, [8, 6, 3], seed=2)
    with torch.no_grad():
        before = model.hidden(make_batch(items))
        for t in range(8):
            changed = items.clone()
            changed[:, t] = torch.where(items[:, t] > 0, items[:, t] % NUM_ITEMS + 1, 0)
            after = model.hidden(make_batch(changed))
            assert torch.allclose(after[:, :t], before[:, :t], rtol=0, atol=1e-6), t
            real = items[:, t] > 0
            # The changed step itself must see its new item (a model that ignores it would pass).
            assert ((after[real, t] - before[real, t]).abs().amax(-1) > 1e-3).all(), t


@pytest.mark.parametrize("case", CASES)
def test_more_left_padding_changes_nothing(case):
    model = build(case)
    items = random_items(3, 6, [6, 4, 2], seed=3)
    users = torch.tensor([3, 0, 7])
    with torch.no_grad():
        short = model.hidden(make_batch(items, users))
        padded = model.hidden(make_batch(F.pad(items, (5, 0)), users))
    assert padded.shape == (3, 11, 8)
    difference = (padded[:, 5:] - short).abs().max()
    assert difference < 1e-5, difference
    assert torch.equal(padded[:, :5], torch.zeros(3, 5, 8))


@pytest.mark.parametrize("case", CASES)
def test_gradcheck_float64(case):
    """Analytic gradients w.r.t. the item vectors and every encoder parameter match finite
    differences (including zero gradient for the padding vector)."""
    encoder = build(case, 4, 4).encoder.double()
    batch = make_batch(torch.tensor([[0, 3, 5, 2], [4, 1, 7, 6]]))
    names, params = zip(*encoder.named_parameters())
    vectors = torch.randn(2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(4))

    def forward(vectors, *params):
        return functional_call(encoder, dict(zip(names, params)), (batch, vectors))

    inputs = (vectors.requires_grad_(), *(p.detach().clone().requires_grad_() for p in params))
    # fast_mode compares J u with finite differences along random directions u: every input and
    # parameter still enters, at a fraction of the cost of the full Jacobian.
    assert torch.autograd.gradcheck(forward, inputs, eps=1e-6, atol=1e-6, rtol=1e-4,
                                    fast_mode=True)


def caser_by_hand(encoder, vectors: torch.Tensor, user: torch.Tensor) -> torch.Tensor:
    """Caser's hidden state for one step from the paper's equations, one filter at a time.

    vectors (L, E): the item vectors of the last L steps, oldest first (zeros before the history);
    user (U,): p_u. Horizontal filter F (h x E), h = 1..L: c_i = ReLU(<E[i:i+h], F> + b),
    o = max_i c_i. Vertical filter G (L x 1): o' = sum_l G_l E[l] + b (E values).
    z = ReLU(W [o; o'] + b_z), hidden = [z; p_u]. The two conv biases b are not in the paper's
    equations but in the authors' code (caser_pytorch's nn.Conv2d, as here); W's columns are
    stored [o' | o], the authors' order.
    """
    L, E = vectors.shape
    o = []
    for height, conv in zip(range(1, L + 1), encoder.horizontal):
        for j in range(conv.out_channels):
            F_j = conv.weight[j].T                                         # (h, E)
            c = [torch.relu((vectors[i:i + height] * F_j).sum() + conv.bias[j])
                 for i in range(L - height + 1)]
            o.append(torch.stack(c).max())
    G, g = encoder.vertical.weight, encoder.vertical.bias                  # (d', L), (d',)
    o_prime = torch.cat([sum(G[k, l] * vectors[l] for l in range(L)) + g[k] for k in range(len(G))])
    W = encoder.fc.weight
    W_vertical, W_horizontal = W[:, :len(o_prime)], W[:, len(o_prime):]
    z = torch.relu(W_horizontal @ torch.stack(o) + W_vertical @ o_prime + encoder.fc.bias)
    return torch.cat([z, user])


def build_caser(user_dim: int, hidden_dim: int = 7, dropout: float = 0.0):
    torch.manual_seed(0)
    options = {"window": 3, "vertical_filters": 2, "horizontal_filters": 3, "user_dim": user_dim}
    config = ModelConfig(name="caser", embedding_dim=4, hidden_dim=hidden_dim, dropout=dropout,
                         tied_embeddings=False, options=options)
    return build_model(config, DIMS).eval()


def test_caser_matches_the_paper_by_hand():
    """Every step's hidden state (L = 3, d = 3, d' = 2, E = 4, z 5 + p_u 2) equals the paper's
    convolutions, pooling, FC layer and [z; p_u] recomputed from the module's weights; dropout
    (0.5) is off in eval mode. Rows are left-padded so early windows hold zero rows."""
    model = build_caser(user_dim=2, dropout=0.5)
    encoder = model.encoder
    items = random_items(3, 5, [5, 3, 1], seed=9)
    batch = make_batch(items, torch.tensor([4, 0, 9]))
    with torch.no_grad():
        hidden = model.hidden(batch)
        vectors = F.pad(model.tables.embed(items), (0, 0, 2, 0))           # L - 1 zero rows first
        users = encoder.users.weight[batch.users]
        expected = torch.zeros(3, 5, 7)
        for b, t in (items > 0).nonzero().tolist():
            expected[b, t] = caser_by_hand(encoder, vectors[b, t:t + 3], users[b])
        # The data exercises what the equations say: some horizontal responses are clipped by the
        # ReLU, some z units are zero, and the user with id 0 (unknown) reads p_u = 0.
        responses = torch.cat([conv(vectors.transpose(1, 2)).flatten() for conv in encoder.horizontal])
        assert (responses < 0).any() and (responses > 0).any()
        assert (expected[..., :5] == 0).any() and (expected[..., :5] > 0).any()
        assert torch.equal(expected[1, :, 5:], torch.zeros(5, 2))
    torch.testing.assert_close(hidden, expected)
    # In training mode the dropout before the FC layer acts.
    torch.manual_seed(1)
    assert not torch.allclose(model.train().hidden(batch)[items > 0], hidden[items > 0], atol=1e-3)


def test_caser_user_vector_enters_the_output():
    """Changing only the user id changes every real step (z unchanged, p_u appended last); with
    user_dim 0 the hidden state is z alone and the user id is not read."""
    model = build_caser(user_dim=2)
    items = random_items(1, 5, [4], seed=10).expand(3, -1)
    with torch.no_grad():
        hidden = model.hidden(make_batch(items, torch.tensor([1, 2, 1])))
    real = items[0] > 0
    # Close, not bit-equal: a row's float sums may depend on its place in the batch (BLAS blocking).
    torch.testing.assert_close(hidden[0], hidden[2])
    torch.testing.assert_close(hidden[0, :, :5], hidden[1, :, :5])        # z does not see the user
    assert (hidden[0, real] - hidden[1, real]).abs().amax(-1).min() > 1e-3
    users = model.encoder.users.weight
    assert torch.equal(hidden[:, real, 5:], users[[1, 2, 1]].unsqueeze(1).expand(-1, 4, -1))

    no_user = build_caser(user_dim=0)
    assert sum(p.numel() for p in no_user.encoder.users.parameters()) == 0
    with torch.no_grad():
        first = no_user.hidden(make_batch(items[:1], torch.tensor([1])))
        for user in (0, 2, 10):
            assert torch.equal(no_user.hidden(make_batch(items[:1], torch.tensor([user]))), first)
    assert first.shape == (1, 5, 7)
    vectors = F.pad(no_user.tables.embed(items[:1]), (0, 0, 2, 0))[0]
    with torch.no_grad():
        expected = caser_by_hand(no_user.encoder, vectors[-3:], torch.zeros(0))
    torch.testing.assert_close(first[0, -1], expected)


def reference_conv(h: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Loop version: h (B, T, C), weights (B, T, H, K) -> out[b, t, c] =
    sum_k weights[b, t, c // (C / H), k] * h[b, t - K + 1 + k, c], zero before step 0."""
    B, T, C = h.shape
    H, K = weights.shape[-2:]
    out = torch.zeros_like(h)
    for b in range(B):
        for t in range(T):
            for c in range(C):
                for k in range(K):
                    if t - K + 1 + k >= 0:
                        out[b, t, c] += weights[b, t, c // (C // H), k] * h[b, t - K + 1 + k, c]
    return out


def test_convolutions_match_a_loop_reference():
    h = torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(7))
    light = LightweightConv(heads=2, kernel_size=3)
    with torch.no_grad():
        light.weight.copy_(torch.tensor([[0.0, 1.0, 2.0], [-1.0, 0.5, 0.0]]))
        expected = reference_conv(h, light.weight.softmax(-1).expand(2, 5, 2, 3))
        assert torch.allclose(light(h), expected, atol=1e-6)
        # Unnormalised taps: [0, 0, 1] on head 0 copies the current step.
        light.weight.copy_(torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]))
        light.weight_softmax = False
        assert torch.equal(light(h)[..., :2], h[..., :2])
        assert torch.equal(light(h)[:, 2:, 2:], h[:, :3, 2:])   # head 1 reads two steps back
        assert torch.equal(light(h)[:, :2, 2:], torch.zeros(2, 2, 2))
        dynamic = DynamicConv(4, heads=2, kernel_size=3)
        weights = dynamic.kernel(h).view(2, 5, 2, 3).softmax(-1)
        assert torch.allclose(dynamic(h), reference_conv(h, weights), atol=1e-6)


def test_weight_dropout_drops_normalised_taps_in_training_only():
    """DropConnect on softmax(W), scaled by 1 / (1 - p) (Wu et al.'s weight dropout), not on W
    before the softmax; eval mode reads the whole kernel."""
    h = torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(7))
    light = LightweightConv(heads=2, kernel_size=3, weight_dropout=0.5)
    with torch.no_grad():
        light.weight.copy_(torch.tensor([[0.0, 1.0, 2.0], [-1.0, 0.5, 0.0]]))
        taps = light.weight.softmax(-1)
        assert torch.allclose(light.eval()(h), reference_conv(h, taps.expand(2, 5, 2, 3)), atol=1e-6)
        torch.manual_seed(11)
        dropped = F.dropout(taps, 0.5, training=True)
        assert 0 < (dropped == 0).sum() < 6                       # this seed drops some taps
        torch.manual_seed(11)
        trained = light.train()(h)
    assert torch.allclose(trained, reference_conv(h, dropped.expand(2, 5, 2, 3)), atol=1e-6)


@pytest.mark.parametrize("residual", convrec.RESIDUALS)
def test_conv_block_residuals_match_a_reference(residual):
    """ConvBlock's three forms: "none" (ConvRec's text), "ffn" (the author's later code), "both"
    (DynamicRec). Each form's output differs from the others' on the same weights."""
    torch.manual_seed(4)
    x, keep = torch.randn(2, 5, 4), torch.ones(2, 5, 1)
    outputs = {}
    for form in convrec.RESIDUALS:
        torch.manual_seed(5)
        block = convrec.ConvBlock(LightweightConv(2, 3), 4, 6, 0.0, form).eval()
        with torch.no_grad():
            outputs[form] = block(x, keep)
            if form == residual:
                conv = block.project(block.conv(F.glu(block.expand(block.conv_norm(x)), -1)))
                after = x + conv if form == "both" else conv
                ffn = block.ffn(block.ffn_norm(after))
                expected = after + ffn if form != "none" else ffn
    assert torch.allclose(outputs[residual], expected, atol=1e-6)
    assert all(not torch.allclose(outputs[residual], out, atol=1e-3)
               for form, out in outputs.items() if form != residual)


@pytest.mark.parametrize("form", ["code", "paper"])
def test_attention_block_matches_a_step_by_step_reference(form):
    """SASRec's block one query at a time. "code" (kang205/SASRec): queries and the residuals
    from LN(x), keys and values from x itself, LN again before the FFN. "paper" (sec. III):
    x + g(LN(x)) for both sub-layers. Each form fails the other's reference."""
    torch.manual_seed(3)
    block = sasrec.AttentionBlock(dim=4, heads=2, ffn_dim=6, dropout=0.0, form=form).eval()
    x = torch.randn(1, 3, 4)
    allowed = torch.ones(3, 3, dtype=torch.bool).tril().view(1, 1, 3, 3)
    normed = F.layer_norm(x[0], (4,), block.attention_norm.weight, block.attention_norm.bias)
    keys = x[0] if form == "code" else normed
    q = normed @ block.qkv.weight[:4].t() + block.qkv.bias[:4]
    k, v = (keys @ block.qkv.weight[4:].t() + block.qkv.bias[4:]).split(4, dim=1)
    expected = []
    for t in range(3):
        heads = [torch.softmax(q[t, h] @ k[:t + 1, h].t() / 2 ** 0.5, 0) @ v[:t + 1, h]
                 for h in (slice(0, 2), slice(2, 4))]
        after = (normed[t] if form == "code" else x[0, t]) + torch.cat(heads)
        after_normed = F.layer_norm(after, (4,), block.ffn_norm.weight, block.ffn_norm.bias)
        expected.append((after_normed if form == "code" else after) + block.ffn(after_normed))
    with torch.no_grad():
        assert torch.allclose(block(x, allowed)[0], torch.stack(expected), atol=1e-5)


def test_options_are_checked():
    with pytest.raises(ValueError, match=r"options\['block'\]='papers'"):
        build_model(ModelConfig(name="sasrec", options={"block": "papers"}), DIMS)
    with pytest.raises(ValueError, match=r"options\['residual'\]=True; known \('none', 'ffn', 'both'\)"):
        build_model(ModelConfig(name="convrec", options={"residual": True}), DIMS)
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['kernal_size'\]"):
        build_model(ModelConfig(name="convrec", options={"kernal_size": 3}), DIMS)
    with pytest.raises(ValueError, match=r"options\['heads'\]=3 must divide hidden_dim=8"):
        build_model(ModelConfig(name="sasrec", embedding_dim=8, hidden_dim=8,
                                options={"heads": 3}), DIMS)
    model = build("sasrec")
    with pytest.raises(ValueError, match=r"window length 17 exceeds options\['max_length'\]=16"):
        model.hidden(make_batch(random_items(1, 17, [17], seed=5)))


@pytest.mark.parametrize("case", ["sasrec", "convrec"])
def test_a_ranker_reads_the_last_max_length_steps_of_a_longer_history(case):
    """Learned positions end at max_length (16): the evaluation protocols build wider batches
    (TDM's first halves: up to 100 steps), and the ranker must rank them from their last 16
    steps, as the model's training windows were, not fail."""
    model = build(case)
    assert model.max_length == 16
    long = make_batch(random_items(3, 40, [40, 20, 5], seed=8))
    cut = long.steps(slice(-16, None))
    ranker = ModelRanker(model)
    assert torch.equal(ranker.topk(long, 10), ranker.topk(cut, 10))
    targets = torch.tensor([3, 4, 5])
    assert torch.equal(ranker.target_ranks(long, targets), ranker.target_ranks(cut, targets))
    candidates = torch.arange(1, 31).repeat(3, 1)
    assert torch.equal(ranker.candidate_scores(long, candidates), ranker.candidate_scores(cut, candidates))
    assert build("dynamicrec").max_length is None              # no positions, no limit


@pytest.mark.parametrize("module", [caser, convrec, dynamicrec, sasrec])
def test_recommended_configs_build(module):
    config = module.recommended_config()
    assert config.tied_embeddings == (module is not caser)
    hidden = build_model(config, DIMS).hidden(make_batch(random_items(2, 10, [10, 3], seed=6)))
    assert hidden.shape == (2, 10, config.hidden_dim)
