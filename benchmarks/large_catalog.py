"""Large catalogs: HRNN training with an importance-sampled (IS) vs a dense softmax, and the sampler.

    python benchmarks/large_catalog.py [--quick] [--sizes 10k 100k 1M 4M] [--steps 8] [--write-docs]

Everything runs on 2 threads (torch.set_num_threads(2)) in one run on one machine, fp32 unless said:
- HRNN training events/s and peak RSS per catalog size, IS (K = 2048 shared negatives drawn from
  count^0.75, log-Q corrected) vs dense softmax (every event scores every item): same model
  (hidden 128, item vectors 128), same batches (256 windows x 32 steps, no padding), both through
  dist_rec.train.step.train_step. Each configuration runs in a fresh interpreter (`--one JSON`)
  so its peak RSS (ru_maxrss) is its own.
- The dense softmax is the strongest one we could write: blocked over events so a block of logits
  fits, gradients computed in the same pass (3 matmuls), one reused logits buffer. The plain one
  (dist_rec.losses.full_softmax) keeps (N, C) logits and their gradient: reported, never run.
- The compute floor: FLOPs per event over the torch.mm 2048^3 rate measured in this run.
- Our GRU4Rec at the official implementation's two published CPU settings, fp32 (the targets);
  then again under bf16 autocast (train_step(bf16=True)), reported separately.
- Alias sampler draws/s and build time against torch.multinomial and numpy Generator.choice(p=).
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import time

import numpy as np
import torch
from torch.autograd.function import once_differentiable

from common import (NUM_DELTA_BUCKETS, NUM_EVENT_TYPES, NUM_USERS, ROOT, benchmark_parser, command_line,
                    cpu_times, emit, load_average, machine, markdown_table, matmul_gflops, median_rate, now_utc,
                    peak_rss_bytes, replace_section, run_one, save_figure, spawn, synchronize,
                    total_memory_bytes,
                    zipf_workload)
from dist_rec.config import ModelConfig, SamplerConfig
from dist_rec.embeddings.optim import RowWiseAdagrad
from dist_rec.losses import build_loss, full_softmax
from dist_rec.models import Dimensions, build_model
from dist_rec.sampling.alias import AliasSampler
from dist_rec.train.step import Optimizers, train_step

THREADS = 2
WINDOW = 32                                    # T: steps per window
NUM_BATCHES = 4                                # distinct batches, cycled
ZIPF_EXPONENT = 1.0                            # item popularity ∝ rank^-1
ALPHA = 0.75                                   # sampler q ∝ count^alpha
NEGATIVES = 2048
HRNN = {"model": "hrnn", "hidden": 128, "embedding": 128, "tied": False, "batch": 256}
# (hidden = item vector size, session-parallel rows, official events/s) of the official GRU4Rec
# PyTorch code on this kind of CPU; item vectors tied as in its default constrained embedding.
GRU4REC = [(480, 48, 2200.0), (512, 240, 5200.0)]
GRU4REC_SPEEDUP = 3.0
DENSE_BLOCK_BYTES = 2 ** 30                    # one block of dense logits
FLOPS_FORMULA = "18*H*(I+H) (GRU forward + backward) + 6*S*D (S scored items per event: forward + 2 backward matmuls)"


class _BlockedFullSoftmax(torch.autograd.Function):
    """Mean full-softmax cross-entropy over items 1..C-1, `block_rows` events at a time.

    hidden (N, D), weight (C, D), bias (C,), targets (N,) in 1..C-1 -> scalar. Each block's
    softmax is turned into its gradients at once (logits, then probs @ weight and probs^T @ hidden),
    so no (N, C) tensor exists and no block is computed twice.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, block_rows):
        items, item_bias = weight[1:], bias[1:]
        grad_hidden, grad_weight, grad_bias = torch.empty_like(hidden), torch.zeros_like(weight), torch.zeros_like(bias)
        block = hidden.new_empty(min(block_rows, len(hidden)), len(items))  # reused: fresh ones page-fault
        total = hidden.new_zeros(())
        for start in range(0, len(hidden), block_rows):
            rows = slice(start, start + block_rows)
            h, t = hidden[rows], targets[rows]
            probs = torch.addmm(item_bias, h, items.t(), out=block[:len(h)])
            top = probs.amax(1, keepdim=True)
            sums = probs.sub_(top).exp_().sum(1, keepdim=True)
            probs.div_(sums)
            total += (top + sums.log()).sum() - ((h * weight[t]).sum(1) + bias[t]).sum()
            torch.mm(probs, items, out=grad_hidden[rows])
            grad_weight[1:].addmm_(probs.t(), h)
            grad_bias[1:] += probs.sum(0)
        # minus the one-hot target term of d loss / d logits = probs - onehot
        grad_hidden -= weight[targets]
        grad_weight.index_add_(0, targets, hidden, alpha=-1.0)
        grad_bias.index_add_(0, targets, torch.ones_like(targets, dtype=bias.dtype), alpha=-1.0)
        ctx.grads = grad_hidden, grad_weight, grad_bias
        return total / len(hidden)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        scale = grad / ctx.grads[0].shape[0]
        return *(g.mul_(scale) for g in ctx.grads), None, None


class BlockedFullSoftmax:
    """The dense loss with train_step's signature; block rows chosen so one block is block_bytes."""

    def __init__(self, block_bytes: int = DENSE_BLOCK_BYTES):
        self.block_bytes = block_bytes

    def __call__(self, hidden, targets, tables, weights=None, generator=None) -> torch.Tensor:
        if weights is not None:
            raise ValueError("BlockedFullSoftmax: event weights are not supported")
        weight, bias = tables.output_weight()
        block_rows = max(1, self.block_bytes // (4 * weight.shape[0]))
        return _BlockedFullSoftmax.apply(hidden, weight, bias, targets, block_rows)


def check_dense() -> float:
    """Max |difference| of loss and gradients between the blocked and the library full softmax."""
    from dist_rec.embeddings.table import ItemTables
    torch.manual_seed(0)
    tables = ItemTables(50, 8, 8)
    hidden, targets = torch.randn(37, 8, requires_grad=True), torch.randint(1, 51, (37,))
    results = []
    for loss_fn in (lambda: full_softmax(hidden, targets, tables), lambda: BlockedFullSoftmax(4 * 51 * 5)(hidden, targets, tables)):
        hidden.grad = tables.output.weight.grad = tables.bias.weight.grad = None
        loss = loss_fn()
        loss.backward()
        results.append([loss.detach(), hidden.grad, tables.output.weight.grad.to_dense(), tables.bias.weight.grad.to_dense()])
    return max(float((a - b).abs().max()) for a, b in zip(*results))


def train_figures(config: dict) -> dict:
    """Train one configuration -> events/s, state bytes and peak memory: RSS on the CPU (run in a
    fresh process, so that the peak is its own), allocated device bytes on a GPU (in-process)."""
    device = torch.device(config.get("device", "cpu"))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(config["seed"])
    counts, batches = zipf_workload(config["num_items"], config["batch"], WINDOW, NUM_BATCHES,
                                   batch_seed=config["seed"], exponent=ZIPF_EXPONENT)
    batches = [batch.to(device) for batch in batches]
    with device:   # tables initialised where they live: 16M rows on the CPU first take minutes
        model = build_model(ModelConfig(name=config["model"], embedding_dim=config["embedding"],
                                        hidden_dim=config["hidden"], tied_embeddings=config["tied"]),
                            Dimensions(config["num_items"], NUM_USERS, NUM_DELTA_BUCKETS, NUM_EVENT_TYPES)).to(device)
    if config["loss"] == "dense":
        loss_fn = BlockedFullSoftmax(config.get("dense_block_bytes", DENSE_BLOCK_BYTES))
    else:
        loss_fn = build_loss(SamplerConfig(num_negatives=NEGATIVES, alpha=ALPHA), counts).to(device)
    optimizers = Optimizers(dense=torch.optim.Adam(model.dense_parameters(), lr=1e-3),
                            sparse=RowWiseAdagrad(model.sparse_parameters(), lr=0.05))
    generator = torch.Generator(device=device).manual_seed(config["seed"])
    batch_cycle = itertools.cycle(batches)

    def steps():
        for _ in range(config["steps"]):
            train_step(model, next(batch_cycle), loss_fn, optimizers, generator, bf16=config.get("bf16", False))
        synchronize(device)

    events = config["steps"] * config["batch"] * WINDOW
    rate, rates = median_rate(steps, events, config["repeats"], config["warmup"])
    state = sum(p.numel() * p.element_size() for p in model.parameters())
    state += sum(value.numel() * value.element_size() for optimizer in (optimizers.dense, optimizers.sparse)
                 for values in optimizer.state.values() for value in values.values() if torch.is_tensor(value))
    sampler = 0 if config["loss"] == "dense" else sum(
        tensor.numel() * tensor.element_size() for tensor in
        (loss_fn.sampler.prob, loss_fn.sampler.alias, loss_fn.sampler.log_q, loss_fn.log_q, loss_fn.log_data_q))
    figures = {"events_per_s": rate, "runs_events_per_s": rates, "state_bytes": state, "sampler_bytes": sampler}
    if device.type == "cuda":       # in-process on a GPU: the process's RSS would not be this run's
        figures["peak_device_bytes"] = torch.cuda.max_memory_allocated(device)
    else:
        figures["peak_rss_bytes"] = peak_rss_bytes()
    return figures


def flops_per_event(input_dim: int, hidden: int, scored: int, output_dim: int) -> int:
    """One GRU layer (3 gates, forward 2*3H(I+H), backward twice that) + scoring `scored` items."""
    return 18 * hidden * (input_dim + hidden) + 6 * scored * output_dim


def hrnn_input_dim() -> int:
    defaults = ModelConfig()
    return HRNN["embedding"] + defaults.delta_embedding_dim + 1 + defaults.type_embedding_dim


def dense_plan(estimate_s: float, repeats: int, repeat_s: float = 2.0) -> dict:
    """Warm-up calls, repeats and steps per repeat for a dense step estimated at estimate_s:
    small catalogs get steps enough for ~repeat_s a repeat; a 4M-item step takes minutes, so
    large catalogs get fewer timed steps (one at the extreme)."""
    if estimate_s < 2:
        return {"warmup": 1, "repeats": repeats, "steps": max(1, int(repeat_s / estimate_s))}
    if estimate_s < 30:
        return {"warmup": 1, "repeats": 3, "steps": 1}
    return {"warmup": 0, "repeats": 2 if estimate_s < 120 else 1, "steps": 1}


def sampler_figures(num_items: int, draws: list[int], seed: int) -> dict:
    """Alias build time and draws/s at each draw count vs torch.multinomial and numpy choice(p=)."""
    rng = np.random.default_rng(seed)
    counts = np.zeros(num_items + 1)
    counts[1:] = rng.permutation(np.arange(1, num_items + 1, dtype=np.float64) ** -ZIPF_EXPONENT)
    build_s = statistics.median(_seconds(lambda: AliasSampler.from_counts(counts, ALPHA)) for _ in range(3))
    sampler = AliasSampler.from_counts(counts, ALPHA)
    q = counts ** ALPHA / (counts ** ALPHA).sum()
    q_torch = torch.from_numpy(q).float()
    generator = torch.Generator().manual_seed(seed)
    figures = {"num_items": num_items, "build_s": build_s, "draws": {}}
    for n in draws:
        calls = max(1, 2 ** 16 // n)           # enough work per timing for small draws
        methods = {"alias": lambda: sampler.sample(n, generator),
                   "torch.multinomial": lambda: torch.multinomial(q_torch, n, replacement=True, generator=generator),
                   "numpy choice(p=)": lambda: rng.choice(len(q), size=n, p=q)}
        figures["draws"][n] = {name: median_rate(lambda: [draw() for _ in range(calls)], n * calls, 5)[0]
                               for name, draw in methods.items()}
    return figures


def _seconds(work) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def parse_count(text: str) -> int:
    """'4M', '100k' or '2048' -> int."""
    scale = {"k": 1_000, "m": 1_000_000}.get(text[-1].lower(), 1)
    try:
        return int(float(text[:-1] if scale > 1 else text) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a count: {text!r} (use e.g. 10k, 1M, 4000000)") from None


def acceptance(train: dict, gru: dict, sampler: dict, gflops: float, sizes: list[int],
               reference: int, draws: int) -> list[dict]:
    """The issue's targets, each as one JSON line: value, target, met."""
    rows = []

    def add(name: str, value: float, target: float, at_least: bool = True, note: str = "") -> None:
        met = bool(value >= target if at_least else value <= target)
        rows.append(emit("target", name=name, value=value, target=target,
                         at_least=at_least, met=met, note=note))

    small, large = min(sizes), max(sizes)
    add(f"IS / dense events/s at {reference:,} items",
        _get(train["is", reference], "events_per_s") / _get(train["dense", reference], "events_per_s"), 100.0)
    add(f"IS share of the compute floor at {reference:,} items",
        _floor_share(train["is", reference], hrnn_input_dim(), NEGATIVES, gflops), 0.5)
    for (hidden, rows_, official), result in gru.items():
        add(f"GRU4Rec {hidden}/{rows_} events/s over the official {official:,.0f}",
            _get(result, "events_per_s") / official, GRU4REC_SPEEDUP,
            note="target above the fp32 compute floor" if above_floor(hidden, official, gflops) else "")
    add(f"IS events/s at {large:,} / at {small:,} items",
        _get(train["is", large], "events_per_s") / _get(train["is", small], "events_per_s"), 0.75)
    add(f"IS peak RSS at {large:,} items / its parameter + optimizer bytes",
        _get(train["is", large], "peak_rss_bytes") / _get(train["is", large], "state_bytes"), 1.5, False)
    rates = sampler["draws"][draws]
    add(f"alias / torch.multinomial draws/s ({draws:,} draws)", rates["alias"] / rates["torch.multinomial"], 4.0)
    add(f"alias / numpy choice(p=) draws/s ({draws:,} draws)", rates["alias"] / rates["numpy choice(p=)"], 5.0)
    add("alias build seconds", sampler["build_s"], 0.5, False)
    return rows


def gru4rec_floor(hidden: int, gflops: float) -> float:
    """fp32 events/s that GRU4Rec (input = hidden = item vector size) cannot exceed here."""
    return gflops * 1e9 / flops_per_event(hidden, hidden, NEGATIVES, hidden)


def above_floor(hidden: int, official: float, gflops: float) -> bool:
    """Whether the GRU4Rec target (GRU4REC_SPEEDUP x official) is beyond any fp32 code here."""
    return GRU4REC_SPEEDUP * official > gru4rec_floor(hidden, gflops)


def _get(result: dict, key: str) -> float:
    return float(result.get(key, float("nan")))


def _floor_share(result: dict, input_dim: int, scored: int, gflops: float, hidden: int = HRNN["hidden"]) -> float:
    """Measured events/s over the compute floor's events/s (matmul rate / FLOPs per event)."""
    return _get(result, "events_per_s") * flops_per_event(input_dim, hidden, scored, hidden) / (gflops * 1e9)


def docs_section(run: dict, gflops: float, sizes: list[int], train: dict, gru: dict, gru_bf16: dict,
                 sampler: dict, targets: list[dict]) -> str:
    """The markdown of this benchmark's section of docs/benchmarks.md."""
    input_dim, hidden = hrnn_input_dim(), HRNN["hidden"]
    rows = []
    for n in sizes:
        sampled, dense = train["is", n], train["dense", n]
        plain = 2 * run["batch"] * WINDOW * n * 4
        rows.append([f"{n:,}", _rate(sampled), _share(_floor_share(sampled, input_dim, NEGATIVES, gflops)),
                     _bytes(sampled.get("peak_rss_bytes")), _bytes(sampled.get("state_bytes")),
                     _rate(dense), _share(_floor_share(dense, input_dim, n, gflops)), _bytes(dense.get("peak_rss_bytes")),
                     f"{_bytes(plain)} ({'fits' if plain < total_memory_bytes() else 'does not fit'})",
                     f"{_get(sampled, 'events_per_s') / _get(dense, 'events_per_s'):,.0f}x"])
    gru_rows = [[f"{h} / {b}", _rate(result), f"{official:,.0f}",
                 f"{_get(result, 'events_per_s') / official:.2f}x",
                 _share(_floor_share(result, h, NEGATIVES, gflops, hidden=h)),
                 f"{flops_per_event(h, h, NEGATIVES, h) / 1e6:.1f}M", f"{gru4rec_floor(h, gflops):,.0f}",
                 f"{GRU4REC_SPEEDUP * official:,.0f}",
                 f"{GRU4REC_SPEEDUP * official * flops_per_event(h, h, NEGATIVES, h) / 1e9:.0f}"]
                for (h, b, official), result in gru.items()]
    impossible = [f"{h}/{b}" for h, b, official in gru if above_floor(h, official, gflops)]
    floor_verdict = (f"The {' and '.join(impossible)} target is above this machine's fp32 compute floor:\n"
                     "no fp32 code can meet it here, since it needs more GFLOP/s than torch.mm reaches on one\n"
                     "large square matmul." if impossible else "Both targets are below this machine's fp32 compute floor.")
    bf16_rows = [[f"{h} / {b}", _rate(result),
                  f"{_get(result, 'events_per_s') / _get(gru[h, b, official], 'events_per_s'):.2f}x",
                  f"{_get(result, 'events_per_s') / official:.2f}x"]
                 for (h, b, official), result in gru_bf16.items()]
    bf16_short = [f"{h}/{b}" for (h, b, official), result in gru_bf16.items()
                  if _get(result, "events_per_s") < GRU4REC_SPEEDUP * official]
    bf16_verdict = (f"Even in bf16, {' and '.join(bf16_short)} stays under {GRU4REC_SPEEDUP:g}x the official figure."
                    if bf16_short else f"In bf16 both settings exceed {GRU4REC_SPEEDUP:g}x the official figures.")
    sampler_rows = [[f"{n:,}", *(f"{rates[name] / 1e6:.1f}M" for name in rates),
                     f"{rates['alias'] / rates['torch.multinomial']:.1f}x",
                     f"{rates['alias'] / rates['numpy choice(p=)']:.1f}x"] for n, rates in sampler["draws"].items()]
    target_rows = [[t["name"], f"{t['value']:.3g}", ("≥ " if t["at_least"] else "≤ ") + f"{t['target']:g}",
                    ("met" if t["met"] else "**missed**") + (f" ({t['note']})" if t["note"] else "")]
                   for t in targets]
    errors = [f"- {loss} at {n:,} items failed: {result['error']}" for (loss, n), result in train.items() if "error" in result]
    return f"""## Large catalogs: sampled (IS) vs dense softmax

`{run['command']}` on {run['date']}. {run['cpu']}, {run['cores']} cores, {run['memory_gib']} GiB,
torch {run['torch']}, fp32 (bf16 only where a table says so), `torch.set_num_threads({THREADS})`. 1-minute load average
{run['load_start']:.2f} at the start and {run['load_end']:.2f} at the end (the machine is shared; this run's own
2 threads count about 2); the hypervisor took {100 * run['steal_share']:.1f}% of CPU time (steal).
torch.mm {run['matmul_size']}³ into a reused output: {run['gflops_start']:.0f} GFLOP/s at the start, {run['gflops_end']:.0f}
at the end; the compute floor uses the higher, {gflops:.0f}.

HRNN (hidden {hidden}, item vectors {HRNN['embedding']}, GRU input {input_dim}), batches of {run['batch']}
windows × {WINDOW} steps ({run['batch'] * WINDOW:,} events, Zipf items), Adam on the GRU and row-wise
Adagrad on the item tables, one `train_step` per step. IS: K = {NEGATIVES} shared negatives from
count^{ALPHA}, log-Q corrected. Dense: every event against every item, blocked over events (1 GiB
of logits per block, gradients in the same pass, one reused buffer). Each configuration ran in a
fresh process; peak RSS is its `ru_maxrss`. Events/s is the median over timed repeats after a
warm-up; dense at large catalogs has fewer timed steps (see the JSON lines' `timed_steps`; at
4M one step, no warm-up). "Plain dense needs" is the (N, C) logits plus their gradient that
`dist_rec.losses.full_softmax` would hold, against {run['memory_gib']} GiB of RAM.

{markdown_table(["items", "IS events/s", "IS % of floor", "IS peak RSS", "IS params + optimizer",
                 "dense events/s", "dense % of floor", "dense peak RSS", "plain dense needs", "IS / dense"], rows)}

![events/s and peak RSS against catalog size](img/large_catalog.png)

FLOPs per event: {FLOPS_FORMULA}; HRNN I = {input_dim}, H = D = {hidden}; IS S = K = {NEGATIVES};
dense S = C. The floor is FLOPs per event over the matmul rate; "% of floor" is the measured
events/s over the floor's.
{chr(10).join(errors)}
### Targets

{markdown_table(["figure", "measured", "target", ""], target_rows)}

### GRU4Rec at the official code's CPU settings

Our `gru4rec` (one GRU layer, tied item vectors of the hidden size, sampled softmax over K = {NEGATIVES}
shared negatives, no in-batch negatives), rows × {WINDOW} steps per batch, {run['gru4rec_items']:,} items; the official
figures were measured with session-parallel batches of the same number of rows.

{markdown_table(["hidden / rows", "ours events/s", "official events/s", "ours / official", "% of floor",
                 "FLOPs per event", "fp32 floor events/s", "target events/s", "target needs GFLOP/s"], gru_rows)}

FLOPs per event as above with I = H (the item vector is the GRU input) and S = K = {NEGATIVES}; the floor is
the matmul rate, {gflops:.0f} GFLOP/s, over them. {floor_verdict}

Under bf16 autocast (`train_step(..., bf16=True)`: the encoder in bf16, the loss in fp32;
avx512_bf16 {'present' if run['avx512_bf16'] else 'absent'} on this CPU), same settings, reported apart
from the fp32 figures above, which are the ones the targets use:

{markdown_table(["hidden / rows", "bf16 autocast events/s", "bf16 / fp32", "bf16 / official"], bf16_rows)}

{bf16_verdict}
The official figures come from another CPU, so "ours / official" also measures the machines;
"% of floor" is the figure that carries over.

### Sampling from {sampler['num_items']:,} items (q ∝ count^{ALPHA}, Zipf counts)

Vose alias build: {sampler['build_s']:.3f} s. Draws/s, median of 5:

{markdown_table(["draws per call", "alias", "torch.multinomial", "numpy choice(p=)", "alias / multinomial",
                 "alias / numpy"], sampler_rows)}
"""


def plot(sizes: list[int], train: dict, path) -> None:
    """Events/s and peak RSS against catalog size, IS vs dense."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, (speed, memory) = plt.subplots(1, 2, figsize=(10, 4))
    for loss, label in (("is", f"IS, K = {NEGATIVES}"), ("dense", "dense softmax")):
        speed.plot(sizes, [_get(train[loss, n], "events_per_s") for n in sizes], "o-", label=label)
        memory.plot(sizes, [_get(train[loss, n], "peak_rss_bytes") / 2 ** 30 for n in sizes], "o-", label=label)
    memory.plot(sizes, [_get(train["is", n], "state_bytes") / 2 ** 30 for n in sizes], "k--",
                label="IS parameters + optimizer")
    for axes, title in ((speed, "training events/s"), (memory, "peak RSS (GiB)")):
        axes.set(xscale="log", yscale="log", xlabel="catalog size (items)", title=title)
        axes.grid(True, which="both", alpha=0.3)
        axes.legend()
    save_figure(figure, path)


def _rate(result: dict) -> str:
    return result.get("error", f"{_get(result, 'events_per_s'):,.0f}")[:40]


def _share(value: float) -> str:
    return f"{100 * value:.0f}%"


def _bytes(value) -> str:
    if value is None:
        return "n/a"
    return f"{value / 2 ** 30:.2f} GiB" if value >= 2 ** 30 else f"{value / 2 ** 20:.0f} MiB"


def main(argv: list[str] | None = None) -> None:
    parser = benchmark_parser(__doc__, "tiny sizes, few steps: checks the script in seconds",
                              "rewrite the large_catalog section of docs/benchmarks.md and docs/img/large_catalog.png")
    parser.add_argument("--sizes", nargs="+", type=parse_count, help="catalog sizes (default 10k 100k 1M 4M)")
    parser.add_argument("--steps", type=int, help="timed steps per repeat for IS and GRU4Rec (default 8)")
    args = parser.parse_args(argv)
    torch.set_num_threads(THREADS)
    if run_one(args, train_figures):
        return

    quick = args.quick
    sizes = sorted(args.sizes or ([1_000, 10_000] if quick else [10_000, 100_000, 1_000_000, 4_000_000]))
    steps, repeats = args.steps or (2 if quick else 8), 2 if quick else 5
    reference = 1_000_000 if 1_000_000 in sizes else max(sizes)
    sampler_items, draws = (10_000, 2 ** 14) if quick else (1_000_000, 2 ** 20)
    gru_settings = [(64, 8, official) for _, _, official in GRU4REC] if quick else GRU4REC
    matmul_size = 512 if quick else 2048
    run = {"date": now_utc(), "command": command_line(), "load_start": load_average(), **machine(),
           "batch": 32 if quick else HRNN["batch"], "gru4rec_items": 10_000 if quick else 1_000_000,
           "matmul_size": matmul_size}
    emit("machine", **run)
    steal_start = cpu_times()
    run["gflops_start"] = emit("matmul_gflops", value=matmul_gflops(matmul_size), size=matmul_size, when="start")["value"]
    error = emit("dense_check", max_abs_error=check_dense())["max_abs_error"]
    if error > 1e-4:
        raise RuntimeError(f"blocked dense softmax differs from dist_rec.losses.full_softmax by {error}")

    sampler = sampler_figures(sampler_items, [draws, NEGATIVES], seed=0)
    emit("alias_build_s", value=sampler["build_s"], num_items=sampler_items)
    for n, rates in sampler["draws"].items():
        emit("draws_per_s", num_items=sampler_items, draws_per_call=n, **rates)

    train = {}
    events_per_step = run["batch"] * WINDOW
    for num_items in sizes:
        base = {**HRNN, "batch": run["batch"], "num_items": num_items, "seed": 0}
        estimate = events_per_step * flops_per_event(hrnn_input_dim(), HRNN["hidden"], num_items, HRNN["hidden"]) / (
            run["gflops_start"] * 1e9)
        for loss, plan in (("is", {"warmup": 1, "repeats": repeats, "steps": steps}),
                           ("dense", dense_plan(estimate, repeats))):
            train[loss, num_items] = result = spawn(__file__, {**base, "loss": loss, **plan})
            # Logits and their gradient: the two (N, C) tensors autograd holds in the plain softmax.
            plain = 2 * events_per_step * num_items * 4
            extra = {"plain_dense_bytes": plain, "plain_dense_fits": plain < total_memory_bytes()} if loss == "dense" else {}
            emit("train", loss=loss, num_items=num_items, timed_steps=plan["repeats"] * plan["steps"], **extra, **result)

    gru, gru_bf16 = {}, {}
    for hidden, rows, official in gru_settings:
        for bf16, results in ((False, gru), (True, gru_bf16)):
            config = {"model": "gru4rec", "hidden": hidden, "embedding": hidden, "tied": True, "batch": rows,
                      "num_items": run["gru4rec_items"], "seed": 0, "loss": "is", "bf16": bf16,
                      "warmup": 1, "repeats": repeats, "steps": max(1, steps // 2)}
            results[hidden, rows, official] = result = spawn(__file__, config)
            emit("gru4rec", hidden=hidden, batch=rows, window=WINDOW, negatives=NEGATIVES, bf16=bf16,
                 num_items=config["num_items"], official_events_per_s=official, **result)

    run["gflops_end"] = emit("matmul_gflops", value=matmul_gflops(matmul_size), size=matmul_size, when="end")["value"]
    gflops = max(run["gflops_start"], run["gflops_end"])  # the conservative (higher) floor
    targets = acceptance(train, gru, sampler, gflops, sizes, reference, draws)
    run["load_end"] = emit("load_end", value=load_average())["value"]
    steal_end = cpu_times()
    run["steal_share"] = emit("cpu_steal_share", value=(steal_end[0] - steal_start[0]) / (steal_end[1] - steal_start[1]))["value"]
    if args.write_docs:
        replace_section("large_catalog", docs_section(run, gflops, sizes, train, gru, gru_bf16, sampler, targets))
        plot(sizes, train, ROOT / "docs" / "img" / "large_catalog.png")


if __name__ == "__main__":
    main()
