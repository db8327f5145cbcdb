"""GRU4Rec, the user-based GRU and HRNN: shapes, causality, resets, the paper's equations,
gradients, and learning planted patterns on toy worlds."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call

from dist_rec.batch import SequenceBatch
from dist_rec.config import ModelConfig
from dist_rec.models import Dimensions, build_model
from dist_rec.models.user_gru import rectify

DIMS = Dimensions(num_items=50, num_users=6, num_delta_buckets=8, num_event_types=4)
USER_GRUS = [{"integration": "linear"}, {"integration": "rectified"},
             {"integration": "rectified", "rectified_temperature": 0.1},
             {"integration": "attentional"}]
MODELS = [("gru4rec", {}), ("gru4rec", {"reset_on_session_start": False})] + [
    ("user_gru", options) for options in USER_GRUS] + [("hrnn", {})]



def make_batch(items: torch.Tensor, users: torch.Tensor, starts: torch.Tensor | None = None,
               seed: int = 0) -> SequenceBatch:
    """items (B, T) with 0 = padding; random deltas and types; session start at each first item."""
    generator = torch.Generator().manual_seed(seed)
    real = items > 0
    if starts is None:
        starts = real & ~torch.cat([torch.zeros_like(real[:, :1]), real[:, :-1]], dim=1)
    targets = torch.cat([items[:, 1:], torch.zeros_like(items[:, :1])], dim=1)
    return SequenceBatch(items=items, targets=targets,
                         deltas=torch.randint(1, 8, items.shape, generator=generator) * real,
                         session_starts=starts,
                         event_types=torch.randint(1, 5, items.shape, generator=generator) * real,
                         target_types=torch.randint(1, 5, items.shape, generator=generator) * real,
                         users=users)


def random_batch(rows: int, steps: int, seed: int = 0) -> SequenceBatch:
    generator = torch.Generator().manual_seed(seed)
    items = torch.randint(1, DIMS.num_items + 1, (rows, steps), generator=generator)
    users = torch.randint(0, DIMS.num_users + 1, (rows,), generator=generator)
    return make_batch(items, users, seed=seed)


def build(name: str, options: dict, seed: int = 0, dims: Dimensions = DIMS, **sizes):
    torch.manual_seed(seed)
    config = ModelConfig(name=name, **{"embedding_dim": 12, "hidden_dim": 10, **sizes},
                         options=options)
    return build_model(config, dims).eval()


@pytest.mark.parametrize("name,options", MODELS)
def test_shapes_causality_and_padding(name, options):
    model = build(name, options, embedding_dim=12, hidden_dim=10)
    batch = random_batch(4, 9)
    hidden = model.hidden(batch)
    assert hidden.shape == (4, 9, 10)

    # Changing the input at step t leaves every earlier step bit-identical and changes step t.
    t = 5
    changed = make_batch(batch.items.clone(), batch.users, batch.session_starts.clone())
    changed.items[:, t] = batch.items[:, t] % DIMS.num_items + 1
    other = model.hidden(changed)
    assert torch.equal(other[:, :t], hidden[:, :t])
    assert (other[:, t] - hidden[:, t]).abs().amax(-1).min() > 1e-4

    # Left padding does not change the hidden of real steps: the state restarts after padding.
    # Every per-step field is padded (the same deltas and types on the real steps: HRNN reads them).
    padded = SequenceBatch(**{name: torch.cat([torch.zeros(4, 3, dtype=value.dtype), value], 1)
                              if value.dim() == 2 else value
                              for name, value in batch.__dict__.items() if value is not None})
    hidden_padded = model.hidden(padded)
    torch.testing.assert_close(hidden_padded[:, 3:], hidden, rtol=0, atol=1e-6)
    # Padding steps output zeros, so a row with no real step (a user whose every event is on an
    # unknown item) reads the same at any batch width.
    assert torch.equal(hidden_padded[:, :3], torch.zeros(4, 3, 10))
    empty = make_batch(torch.zeros(1, 6, dtype=torch.int64), batch.users[:1],
                       torch.zeros(1, 6, dtype=torch.bool))
    assert torch.equal(model.hidden(empty), torch.zeros(1, 6, 10))


@pytest.mark.parametrize("num_layers", [1, 2])
def test_gru4rec_resets_where_a_session_starts(num_layers):
    model = build("gru4rec", {}, num_layers=num_layers)
    batch = random_batch(3, 10, seed=1)
    t = 6
    batch.session_starts[:, t] = True
    hidden = model.hidden(batch)
    suffix = model.hidden(make_batch(batch.items[:, t:], batch.users, batch.session_starts[:, t:]))
    torch.testing.assert_close(hidden[:, t:], suffix, rtol=0, atol=1e-6)
    # Without the reset the same steps remember the prefix.
    no_reset = build("gru4rec", {"reset_on_session_start": False}, num_layers=num_layers)
    assert (no_reset.hidden(batch)[:, t] - suffix[:, 0]).abs().max() > 1e-3


def test_gru4rec_without_resets_is_a_stacked_gru():
    model = build("gru4rec", {"reset_on_session_start": False}, num_layers=2)
    reference = nn.GRU(12, 10, num_layers=2, batch_first=True)
    for layer, cell in enumerate(model.encoder.cells):
        for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(reference, f"{kind}_l{layer}").data.copy_(getattr(cell, kind))
    batch = random_batch(3, 7, seed=2)
    expected, _ = reference(model.tables.embed(batch.items))
    torch.testing.assert_close(model.hidden(batch), expected, rtol=0, atol=1e-6)


def test_hrnn_is_one_gru_over_item_delta_session_and_type_inputs():
    """HRNN's sec. 2.2 by hand: x_t = [e(a_t); d(delta_t); s_t; f(type_t)] read by one GRU from
    h0 = 0 over each row's real steps (no reset at a session start: s_t is an input). The delta
    and the session bit of step t change step t and leave every earlier step bit-identical."""
    model = build("hrnn", {}, delta_embedding_dim=3, type_embedding_dim=2)
    encoder = model.encoder
    items = torch.randint(1, DIMS.num_items + 1, (3, 6), generator=torch.Generator().manual_seed(6))
    items[1, :2] = 0
    items[2, :4] = 0
    batch = make_batch(items, torch.tensor([1, 2, 3]), seed=6)
    batch.session_starts[0, 3] = True                    # a second session inside row 0
    hidden = model.hidden(batch)
    for row in range(3):
        real = items[row] > 0
        x = torch.cat([model.tables.embed(items[row, real]),
                       encoder.delta_embedding(batch.deltas[row, real]),
                       batch.session_starts[row, real].float().unsqueeze(-1),
                       encoder.type_embedding(batch.event_types[row, real])], dim=-1)
        expected, _ = encoder.gru(x.unsqueeze(0))
        torch.testing.assert_close(hidden[row, real], expected[0], rtol=0, atol=1e-6)
        assert torch.equal(hidden[row, ~real], torch.zeros(int((~real).sum()), 10))

    t = 4                                                # real in every row
    for name in ("deltas", "session_starts"):
        changed = SequenceBatch(**{**batch.__dict__, name: getattr(batch, name).clone()})
        column = getattr(changed, name)[:, t]
        column.copy_(~column if name == "session_starts" else column % 7 + 1)
        other = model.hidden(changed)
        assert torch.equal(other[:, :t], hidden[:, :t]), name
        assert (other[:, t] - hidden[:, t]).abs().amax(-1).min() > 1e-4, name


@pytest.mark.parametrize("options", USER_GRUS)
def test_user_gru_depends_on_the_user(options):
    model = build("user_gru", options)
    items = torch.randint(1, 51, (1, 6), generator=torch.Generator().manual_seed(3)).expand(3, -1)
    hidden = model.hidden(make_batch(items, torch.tensor([1, 2, 1])))
    torch.testing.assert_close(hidden[0], hidden[2], rtol=0, atol=1e-6)  # row-wise matmul rounding
    assert (hidden[0] - hidden[1]).abs().amax(-1).min() > 1e-3  # at every step, the first included


def test_rectify_matches_equation_6_by_hand():
    user = torch.tensor([1.0, 0.5, -1.0, 0.3, 0.7])
    low = torch.tensor([0.0, 0.0, 0.0, 0.4, 0.8])
    high = torch.tensor([0.8, 0.8, 0.8, 0.2, 0.5])
    # 1.0 >= high: kept; 0.5 between: 0.2 * 0.5; -1.0 < low: 0; 0.3 < low: 0; 0.7 < low: 0.
    expected = torch.tensor([1.0, 0.1, 0.0, 0.0, 0.0])
    torch.testing.assert_close(rectify(user, low, high, omega=0.2), expected)
    soft = rectify(user, low, high, omega=0.2, temperature=1e-4)
    torch.testing.assert_close(soft, expected, rtol=0, atol=1e-6)
    # A warm step: 0.5 sits 0.5 above low and 0.3 below high.
    warm = rectify(user[1:2], low[1:2], high[1:2], omega=0.2, temperature=0.1)
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    assert warm.item() == pytest.approx(0.5 * sig(5.0) * (0.2 + 0.8 * sig(-3.0)), rel=1e-6)


def test_linear_user_cell_by_hand():
    """H = E = U = 1, every weight set by hand; two steps of eq. (3)-(5)."""
    dims = Dimensions(num_items=2, num_users=1, num_delta_buckets=2, num_event_types=1)
    model = build("user_gru", {}, dims=dims, embedding_dim=1, hidden_dim=1)
    encoder = model.encoder
    with torch.no_grad():
        encoder.user_embedding.weight[1] = 1.0
        # rows [u, r, k], columns [item, user]
        encoder.input_projection.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0]]))
        encoder.input_projection.bias.copy_(torch.tensor([0.0, 0.0, 0.0]))
        encoder.hidden_gates.weight.copy_(torch.tensor([[2.0], [0.0]]))
        encoder.hidden_candidate.weight.fill_(-1.0)
    items = torch.tensor([[0.5], [-0.5]]).unsqueeze(0)  # (1, 2, 1) item vectors
    batch = make_batch(torch.tensor([[1, 2]]), torch.tensor([1]))
    hidden = encoder(batch, items)[0, :, 0]
    # t=1: h0 = 0, u = sig(0) = 0.5, k = tanh(0.5 + 1) -> h1 = 0.5 * tanh(1.5)
    h1 = 0.5 * math.tanh(1.5)
    # t=2: u = sig(2 h1), r = sig(-0.5), k = tanh(-r h1 - 0.5 + 1), h2 = (1 - u) h1 + u k
    u, r = 1 / (1 + math.exp(-2 * h1)), 1 / (1 + math.exp(0.5))
    h2 = (1 - u) * h1 + u * math.tanh(-r * h1 + 0.5)
    assert hidden.tolist() == pytest.approx([h1, h2], rel=1e-6)


def paper_step(encoder, h, item, user, integration, omega):
    """One step of the paper's equations, written from the paper with the module's weights."""
    H, E = encoder.hidden_dim, item.shape[-1]
    W, b = encoder.input_projection.weight, encoder.input_projection.bias
    if integration == "rectified":
        kappa = (h @ encoder.context_hidden.weight.T + torch.cat([item, user], -1)
                 @ encoder.context_inputs.weight.T + encoder.context_inputs.bias)        # eq. (7)
        k1, k2 = kappa.chunk(2, -1)
        user = torch.where(user < k1, torch.zeros_like(user),
                           torch.where(user < k2, omega * user, user))                    # eq. (6)
    if integration == "attentional":
        xi = torch.sigmoid(h @ encoder.context_hidden.weight.T + torch.cat([item, user], -1)
                           @ encoder.context_inputs.weight.T + encoder.context_inputs.bias)  # (8)
        item, user = (1 - xi) * item, xi * user
    gates = torch.sigmoid(h @ encoder.hidden_gates.weight.T + item @ W[:2 * H, :E].T
                          + user @ W[:2 * H, E:].T + b[:2 * H])                            # (3)
    u, r = gates.chunk(2, -1)
    k = torch.tanh((r * h) @ encoder.hidden_candidate.weight.T + item @ W[2 * H:, :E].T
                   + user @ W[2 * H:, E:].T + b[2 * H:])                                   # (4)
    return (1 - u) * h + u * k                                                              # (5)


@pytest.mark.parametrize("integration", ["linear", "rectified", "attentional"])
def test_user_gru_follows_the_paper_equations(integration):
    model = build("user_gru", {"integration": integration, "omega": 0.3}, hidden_dim=10,
                  embedding_dim=12)
    encoder = model.encoder
    with torch.no_grad():
        for name, parameter in encoder.named_parameters():  # far from the attention's near-zero start
            if name != "user_embedding.weight":
                parameter.normal_(generator=torch.Generator().manual_seed(parameter.numel()))
    batch = random_batch(5, 4, seed=4)
    batch.users[0] = 0  # unknown user: zero vector
    items = model.tables.embed(batch.items)
    hidden = encoder(batch, items)
    user = encoder.user_embedding(batch.users)
    assert torch.equal(user[0], torch.zeros(12))
    state = torch.zeros(5, 10)
    for t in range(4):
        state = paper_step(encoder, state, items[:, t], user, integration, 0.3)
        torch.testing.assert_close(hidden[:, t], state, rtol=0, atol=1e-5)
    if integration == "rectified":  # the filter really acted on this data
        kappa = encoder.context_inputs(torch.cat([items[:, 0], user], -1))
        k1, k2 = kappa.chunk(2, -1)
        assert ((user < k1) & (user != 0)).any() and ((user >= k1) & (user < k2)).any()


@pytest.mark.parametrize("name,options", MODELS)
def test_gradients(name, options):
    """gradcheck w.r.t. the item vectors and every encoder parameter, on a batch with left
    padding, a session start inside a row, and (read by HRNN) time deltas and event types."""
    dims = Dimensions(num_items=5, num_users=3, num_delta_buckets=8, num_event_types=4)
    torch.manual_seed(5)
    config = ModelConfig(name=name, embedding_dim=3, hidden_dim=3, options=options,
                         num_layers=2 if name == "gru4rec" else 1,
                         delta_embedding_dim=2, type_embedding_dim=2)
    encoder = build_model(config, dims).encoder.double()
    batch = make_batch(torch.tensor([[0, 1, 2, 3], [4, 5, 1, 2]]), torch.tensor([2, 3]))
    batch.session_starts[1, 2] = True
    names = [n for n, _ in encoder.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in encoder.parameters()]
    vectors = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    padding = (batch.items == 0).unsqueeze(-1)

    def run(vectors, *params):
        # Padding steps zeroed as NextItemModel.hidden does: HRNN runs them after the real steps
        # on its padding rows (delta and type 0), which by design get no gradient.
        hidden = functional_call(encoder, dict(zip(names, params)), (batch, vectors))
        return hidden.masked_fill(padding, 0.0)

    assert torch.autograd.gradcheck(run, (vectors, *params), eps=1e-6, atol=1e-6)


def test_bad_options_name_the_field():
    with pytest.raises(ValueError, match="integration"):
        build("user_gru", {"integration": "bilinear"})
    with pytest.raises(ValueError, match="user_dim"):
        build("user_gru", {"integration": "attentional", "user_dim": 5})
    with pytest.raises(ValueError, match="unknown key.*'hidden_dropuot'"):
        build("gru4rec", {"hidden_dropuot": 0.1})
    with pytest.raises(ValueError, match=r"'hrnn': unknown key\(s\) \['dropuot'\]; known: \[\]"):
        build("hrnn", {"dropuot": 0.1})                           # HRNN has no options at all
    build("hrnn_meta", {"feature_dim": 4})                        # its subclass reads its own
    with pytest.raises(ValueError, match="num_layers"):
        build("user_gru", {}, num_layers=2)
    with pytest.raises(ValueError, match="omega"):
        build("user_gru", {"omega": 1.5})


# Toy worlds ---------------------------------------------------------------------------------------
WINDOW_ROWS, WINDOW_STEPS = 256, 4  # per training batch: short windows keep the Python loop cheap

def walks(rng, successor: np.ndarray, kinds: np.ndarray, users: np.ndarray, steps: int,
          follow: float, sessions_of_one: bool) -> SequenceBatch:
    """Random walks: next = successor[kind of user, item] with prob. `follow`, else uniform."""
    rows, num_items = len(users), successor.shape[1] - 1
    walk = np.zeros((rows, steps + 1), dtype=np.int64)
    walk[:, 0] = rng.integers(1, num_items + 1, rows)
    for t in range(steps):
        planted = successor[kinds[users], walk[:, t]]
        walk[:, t + 1] = np.where(rng.random(rows) < follow, planted,
                                  rng.integers(1, num_items + 1, rows))
    first = np.arange(steps) == 0
    starts = np.tile(first | sessions_of_one, (rows, 1))
    ones = np.ones((rows, steps), dtype=np.int64)
    return SequenceBatch.from_numpy({"items": walk[:, :-1], "targets": walk[:, 1:], "deltas": ones,
                                     "session_starts": starts,
                                     "event_types": ones, "target_types": ones, "users": users})


def train_and_rank(name, options, successor, kinds, sessions_of_one, train_steps, seed=0):
    """Full-softmax training on fresh walks; 0-based ranks of the last step's target on new walks."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    dims = Dimensions(num_items=successor.shape[1] - 1, num_users=len(kinds) - 1,
                      num_delta_buckets=2, num_event_types=1)
    model = build_model(ModelConfig(name=name, embedding_dim=32, hidden_dim=32, options=options),
                        dims)
    dense = torch.optim.Adam(model.dense_parameters(), lr=0.01)
    sparse = torch.optim.Adagrad(model.sparse_parameters(), lr=0.2)
    for _ in range(train_steps):
        users = rng.integers(1, len(kinds), WINDOW_ROWS)
        batch = walks(rng, successor, kinds, users, WINDOW_STEPS, 0.9, sessions_of_one)
        weight, bias = model.tables.output_weight()
        logits = model.hidden(batch) @ weight[1:].T + bias[1:]
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), batch.targets.flatten() - 1)
        dense.zero_grad()
        sparse.zero_grad()
        loss.backward()
        dense.step()
        sparse.step()
    model.eval()
    users = rng.integers(1, len(kinds), 2000)
    test = walks(rng, successor, kinds, users, WINDOW_STEPS, 0.9, sessions_of_one)
    with torch.no_grad():
        return model.tables.target_ranks(model.hidden(test)[:, -1], test.targets[:, -1]), test


@pytest.mark.parametrize("name,options", [("gru4rec", {})] + [("user_gru", o) for o in USER_GRUS])
def test_learns_a_planted_sequence(name, options):
    num_items = 200
    successor = np.zeros((1, num_items + 1), dtype=np.int64)
    successor[0, 1:] = (np.arange(1, num_items + 1) * 7 + 3) % num_items + 1
    kinds = np.zeros(21, dtype=np.int64)  # 20 users, one shared pattern
    ranks, test = train_and_rank(name, options, successor, kinds, False, train_steps=60)
    hit_rate = (ranks < 10).double().mean().item()
    # MostPop: the 10 most frequent test targets themselves (an upper bound on MostPop).
    counts = np.bincount(test.targets[:, -1].numpy(), minlength=num_items + 1)
    most_pop = np.sort(counts)[-10:].sum() / counts.sum()
    # The planted successor comes 90% of the time (+ 0.1 * 10/200 by chance): HR@10 ~ 0.905.
    assert most_pop < 0.12
    assert hit_rate > 0.85


def test_user_gru_beats_gru4rec_when_the_next_item_depends_on_the_user():
    """5 user kinds with their own successor maps; every step is a session of its own, so GRU4Rec
    sees only the current item and cannot tell the kinds apart, while the user GRU is told the
    user (and also resets at session starts, so the user id is its only extra signal)."""
    rng = np.random.default_rng(1)
    num_items, num_kinds = 100, 5
    successor = np.zeros((num_kinds, num_items + 1), dtype=np.int64)
    for kind in range(num_kinds):
        successor[kind, 1:] = rng.permutation(num_items) + 1
    kinds = np.concatenate([[0], rng.integers(0, num_kinds, 40)])  # user 1..40 -> kind
    # Best any user-blind model can do at HR@1: per item, the most likely successor over kinds.
    kind_share = np.bincount(kinds[1:], minlength=num_kinds) / 40
    blind_ceiling = np.mean([
        max(0.9 * kind_share[successor[:, item] == nxt].sum() for nxt in successor[:, item])
        for item in range(1, num_items + 1)]) + 0.1 / num_items

    hits = {}
    for name, options in [("gru4rec", {})] + [
            ("user_gru", {**o, "reset_on_session_start": True}) for o in USER_GRUS]:
        ranks, _ = train_and_rank(name, options, successor, kinds, True, train_steps=100)
        hits[f"{name} {options}"] = (ranks < 1).double().mean().item()
    gru4rec = hits.pop("gru4rec {}")
    assert blind_ceiling == pytest.approx(0.26245, abs=1e-5)  # kind shares .225 .2 .175 .125 .275
    assert 0.2 < gru4rec < blind_ceiling + 0.03, gru4rec  # sampling sd ~ 0.01 on 2000 windows
    assert min(hits.values()) > 0.7, hits  # the planted successor comes 0.9 + 0.1 / 100
