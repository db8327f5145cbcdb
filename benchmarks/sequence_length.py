"""Sequence length: time and memory per training step against the window length T, ConvRec,
DynamicRec and SASRec at their papers' sizes.

    python benchmarks/sequence_length.py [--quick] [--lengths 50 200 400 600 900] [--write-docs]

The claim under test is ConvRec's Table 5 (../shared/papers/convrec_lightweight_conv.md, sec. 5.6):
a lightweight convolution costs O(T) per sequence, self-attention O(T^2). So the batch is fixed at
B = 128 sequences (the batch all three papers train with): a step holds B x T events, and a linear
encoder's cost grows like T (log-log slope 1), attention's like T^2 (slope 2).

- Each model is its module's `recommended_config()`; SASRec and ConvRec get max_length = T (their
  learned positions). Full windows (no padding) of Zipf items, one `train_step` per step: Adam on
  the encoder, row-wise Adagrad on the item tables, fp32, torch.set_num_threads(2).
- Loss: sampled softmax over K = 100 shared negatives from a 10,000-item catalog, a cost per event
  that does not depend on T and is small next to the encoders'. A full softmax would swamp them:
  at B x T = 115,200 events its (N, C) logits are 4.3 GiB at C = 10,000. The loss alone is timed
  too, so its share of the step is shown.
- Each configuration runs in a fresh interpreter (`--one JSON`): peak RSS (ru_maxrss) is its own,
  and "RSS growth" is that peak minus the RSS once the model, optimizers and batches are built:
  what the step itself holds (activations, gradients, the allocator's cache), the part that grows
  with T. "Saved for backward": the bytes autograd keeps for the backward pass, counted by a
  saved-tensors hook, exact and independent of the load. Time per step: median of 3 timed steps
  after a warm-up step; on a loaded machine their spread is shown and wide ones are not read.
- Slopes: least squares of log(figure) on log(T) over every T, and between the two largest T
  (fixed costs flatten the fit at small T).
"""
from __future__ import annotations

import dataclasses
import os
import time

import numpy as np
import torch
import torch._dynamo  # noqa: F401  optimizers import it on first use (~70 MB of RSS): now, before the baseline

from common import (NUM_DELTA_BUCKETS, NUM_EVENT_TYPES, NUM_USERS, ROOT, benchmark_parser, command_line,
                    cpu_times, emit, load_average, machine, markdown_table, median_rate, now_utc, peak_rss_bytes,
                    replace_section, run_one, save_figure, spawn, synchronize, zipf_workload)
from dist_rec.config import SamplerConfig
from dist_rec.embeddings.optim import RowWiseAdagrad
from dist_rec.losses import build_loss
from dist_rec.models import Dimensions, build_model, convrec, dynamicrec, sasrec
from dist_rec.train.step import Optimizers, train_step

THREADS = 2
MODELS = {"convrec": convrec, "dynamicrec": dynamicrec, "sasrec": sasrec}
FULL = {"lengths": [50, 200, 400, 600, 900], "batch": 128, "num_items": 10_000, "negatives": 100,
        "repeats": 3, "timeout_s": 240}
QUICK = {"lengths": [8, 16], "batch": 8, "num_items": 1_000, "negatives": 16,
         "repeats": 1, "timeout_s": 60}
# The figures whose slopes against T are fitted, and their names in the docs.
FIGURES = {"step_s": "time", "saved_bytes": "saved for backward", "rss_growth_bytes": "RSS growth"}
# A model's time slope is read only if, at every T, its slowest timed step is within this factor
# of its fastest: other jobs on a shared machine make wider spreads.
MAX_SPREAD = 1.5
# ConvRec's Table 5: memory in GB at n = 50 ... 900, None = "Failed". The paper names neither the
# device nor the batch (it trains with batches of 128).
PAPER_TABLE5 = {"lengths": [50, 200, 400, 600, 900],
                "sasrec": [1.4, 1.8, 3.2, 5.2, None], "convrec": [0.9, 1.3, 2.8, 4.0, 7.0]}


def model_config(name: str, length: int):
    """The paper's setting, with room for `length` learned positions where the model has them."""
    config = MODELS[name].recommended_config()
    if "max_length" in config.options:
        config = dataclasses.replace(config, options={**config.options, "max_length": length})
    return config


def rss_bytes() -> int:
    """Resident memory of this process now (/proc/self/statm counts pages)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def saved_bytes(work) -> int:
    """Bytes of the tensors autograd saves for the backward pass while `work` runs, each storage
    once: the activation memory, exact and independent of the machine's load. (Saved tensors live
    until the backward pass, so no two of them share an address.)"""
    storages = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        work()
    return sum(storages.values())


def step_figures(config: dict) -> dict:
    """Train one (model, T) -> seconds per step, loss seconds, memory. On the CPU it runs in a
    fresh process (RSS figures); on a GPU the memory figures are the allocator's: "device growth"
    is the step's peak allocated bytes minus those allocated once everything was built."""
    device = torch.device(config.get("device", "cpu"))
    torch.manual_seed(0)
    counts, batches = zipf_workload(config["num_items"], config["batch"], config["length"],
                                   count=config["repeats"] + 1, batch_seed=0)
    batches = [batch.to(device) for batch in batches]
    model_settings = model_config(config["model"], config["length"])
    model = build_model(model_settings, Dimensions(config["num_items"], NUM_USERS, NUM_DELTA_BUCKETS,
                                                   NUM_EVENT_TYPES)).to(device)
    loss_fn = build_loss(SamplerConfig(num_negatives=config["negatives"], alpha=0.75), counts).to(device)
    optimizers = Optimizers(dense=torch.optim.Adam(model.dense_parameters(), lr=1e-3),
                            sparse=RowWiseAdagrad(model.sparse_parameters(), lr=0.05))
    generator = torch.Generator(device=device).manual_seed(0)
    built = rss_bytes()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        built_device = torch.cuda.memory_allocated(device)
    # A new batch every step; the warm-up step (batch 0) also counts the saved tensors.
    queue = iter(batches)

    def step() -> None:
        train_step(model, next(queue), loss_fn, optimizers, generator)   # its loss.item() waits for the GPU

    saved = saved_bytes(step)
    rate, rates = median_rate(step, 1.0, config["repeats"], warmup=0)
    peak = peak_rss_bytes()
    figures = {"step_s": 1 / rate, "runs_step_s": [1 / r for r in rates], "saved_bytes": saved,
               "encoder_params": sum(p.numel() for p in model.encoder.parameters())}
    if device.type == "cuda":       # in-process on a GPU: the process's RSS would not be this run's
        figures.update(device_growth_bytes=torch.cuda.max_memory_allocated(device) - built_device,
                       peak_device_bytes=torch.cuda.max_memory_allocated(device))
    else:
        figures.update(peak_rss_bytes=peak, built_rss_bytes=built, rss_growth_bytes=peak - built)
    # The loss alone, forward and backward, on hidden states of the step's shape (the steps warmed it up).
    hidden = torch.randn(config["batch"] * config["length"], model_settings.hidden_dim, device=device,
                         requires_grad=True)
    targets = batches[0].targets.reshape(-1)

    def loss_alone() -> None:
        loss_fn(hidden, targets, model.tables, None, generator).backward()
        synchronize(device)

    loss_rate, _ = median_rate(loss_alone, 1.0, config["repeats"], warmup=0)
    return {**figures, "loss_s": 1 / loss_rate}


def slope(lengths: list[int], values: list[float]) -> float:
    """Least-squares slope of log(value) on log(T): 1 = linear, 2 = quadratic; NaN under 2 points."""
    if len(values) < 2:
        return float("nan")
    return float(np.polyfit(np.log(lengths), np.log(values), 1)[0])


def slopes(lengths: list[int], results: dict) -> dict:
    """Per model and figure: the slope over every measured T and over the two largest."""
    out = {}
    for name in MODELS:
        measured = [n for n in lengths if "error" not in results[name, n]]
        for key in FIGURES:
            values = [results[name, n][key] for n in measured]
            out[name, key] = {"all": slope(measured, values), "last_two": slope(measured[-2:], values[-2:])}
    return out


def _gib(value: float) -> str:
    return f"{value / 2 ** 30:.2f} GiB"


def spread(result: dict) -> float:
    """Slowest over fastest timed step: how much the load disturbed this configuration."""
    return max(result["runs_step_s"]) / min(result["runs_step_s"])


def docs_section(run: dict, lengths: list[int], results: dict, fits: dict) -> str:
    """The markdown of this benchmark's section of docs/benchmarks.md."""
    rows = []
    for (name, n), result in results.items():
        if "error" in result:
            rows.append([name, n, f"**failed**: {result['error'][:80]}", "", "", "", "", "", ""])
            continue
        runs = result["runs_step_s"]
        rows.append([name, n, f"{result['step_s']:.2f}", f"{min(runs):.2f}–{max(runs):.2f}",
                     f"{100 * result['loss_s'] / result['step_s']:.0f}%", _gib(result["saved_bytes"]),
                     _gib(result["rss_growth_bytes"]), _gib(result["peak_rss_bytes"]), f"{result['encoder_params']:,}"])
    last = f"{lengths[-2]}→{lengths[-1]}"
    slope_rows = [[name, *(f"{fits[name, key][span]:.2f}" for key in FIGURES for span in ("all", "last_two"))]
                  for name in MODELS]
    paper_rows = [[name, *("Failed" if gb is None else gb for gb in PAPER_TABLE5[name]),
                   f"{slope(PAPER_TABLE5['lengths'][:4], PAPER_TABLE5[name][:4]):.2f}"] for name in ("sasrec", "convrec")]
    models = "; ".join(f"{name} d = {config.hidden_dim}, dropout {config.dropout}, "
                       + ", ".join(f"{key} {value}" for key, value in config.options.items() if key != "max_length")
                       for name, config in ((name, model_config(name, lengths[-1])) for name in MODELS))
    logits = 4 * run["batch"] * lengths[-1] * run["num_items"]
    return f"""## Sequence length: ConvRec, DynamicRec, SASRec

`{run['command']}` on {run['date']}. {run['cpu']}, {run['cores']} cores, {run['memory_gib']} GiB,
torch {run['torch']}, fp32, `torch.set_num_threads({THREADS})`. 1-minute load average {run['load_start']:.2f}
at the start and {run['load_end']:.2f} at the end (the machine is shared; this run's own 2 threads count
about 2); the hypervisor took {100 * run['steal_share']:.1f}% of CPU time (steal). The run took
{run['wall_min']:.1f} minutes.

Each model at its paper's sizes (`recommended_config()`; SASRec and ConvRec with T learned
positions): {models}. A **fixed batch of {run['batch']} sequences** of T steps (the papers' training
batch), so a step holds {run['batch']} × T events and a linear encoder's cost grows like T. Full
windows of Zipf items, one `train_step` per step (Adam on the encoder, row-wise Adagrad on the item
tables). Loss: sampled softmax, K = {run['negatives']} shared negatives from {run['num_items']:,} items,
a cost per event that does not depend on T. Not a full softmax: it would dominate every encoder
(at T = {lengths[-1]} its logits alone, {run['batch'] * lengths[-1]:,} events × {run['num_items']:,} items,
are {_gib(logits)}, and their gradient as much again).

Each configuration ran in a fresh process. Seconds per step: median of {run['repeats']} timed steps
after 1 warm-up step (their range shows the load's effect). "Loss share": the loss alone (forward
and backward on hidden states of the step's shape) over the step. "Saved for backward": bytes of
the tensors autograd keeps for the backward pass (each storage once, counted in the warm-up step):
the activation memory, exact whatever the load. "RSS growth": peak RSS (`ru_maxrss`) minus the RSS
once the model, optimizers and batches were built, what the step holds in practice (activations,
gradients, temporaries, the allocator's cache).

{markdown_table(["model", "T", "s / step", "timed steps", "loss share", "saved for backward",
                 "RSS growth", "peak RSS", "encoder params"], rows)}

![seconds per step, saved-for-backward bytes and RSS growth against T, log-log](img/sequence_length.png)

Log-log slopes (1 = linear in T, 2 = quadratic), least squares over every T that ran and between
the two largest:

{markdown_table(["model", *(f"{label}, {span}" for label in FIGURES.values() for span in ("all T", last))],
                slope_rows)}

ConvRec's Table 5 (memory in GB; the paper names neither device nor batch) and the slope of its
figures over T = 50…600:

{markdown_table(["model", *(f"T = {n}" for n in PAPER_TABLE5["lengths"]), "slope 50→600"], paper_rows)}

{reading(fits, results, lengths, run)}
"""


def shape(value: float) -> str:
    """A log-log slope in words."""
    if value != value:
        return "not measured"
    return "linear" if value < 1.3 else "quadratic" if value > 1.7 else "between linear and quadratic"


def reading(fits: dict, results: dict, lengths: list[int], run: dict) -> str:
    """What this run's numbers say about the claim, worded from the numbers themselves."""
    last = f"{lengths[-2]}→{lengths[-1]}"

    def fit(name: str, key: str) -> str:
        return f"{fits[name, key]['all']:.2f}; {fits[name, key]['last_two']:.2f} for {last}"

    lines = []
    for name in MODELS:
        worst = max((spread(r) for (model, _), r in results.items() if model == name and "error" not in r),
                    default=float("nan"))
        timing = (f"time {shape(fits[name, 'step_s']['all'])} ({fit(name, 'step_s')})" if worst <= MAX_SPREAD else
                  f"time not readable, the timed steps of one T differ by up to {worst:.2f}x ({fit(name, 'step_s')})")
        lines.append(f"- {name}: saved for backward {shape(fits[name, 'saved_bytes']['all'])} "
                     f"({fit(name, 'saved_bytes')}), RSS growth ({fit(name, 'rss_growth_bytes')}); {timing}.")
    largest = {name: results[name, lengths[-1]] for name in MODELS}
    if all("error" not in result for result in largest.values()):
        base = largest["convrec"]
        lines.append(f"- At T = {lengths[-1]}, against ConvRec: SASRec saves "
                     f"{largest['sasrec']['saved_bytes'] / base['saved_bytes']:.1f}x the bytes for backward, "
                     f"DynamicRec (d = 200, 2 blocks) {largest['dynamicrec']['saved_bytes'] / base['saved_bytes']:.1f}x. "
                     f"The positions that grow with T are {lengths[-1]} × d parameters, nothing next to the activations.")
    lines.append(f"- The 1-minute load average was {run['load_start']:.1f}–{run['load_end']:.1f} on {run['cores']} "
                 f"cores. Under load every operation also waits for a core, a cost per step that does not grow "
                 f"with T and pulls the time slopes over every T under the encoder's own; the slopes between the "
                 f"two largest T suffer least. The saved-for-backward bytes do not depend on the load at all.")
    paper = {name: slope(PAPER_TABLE5["lengths"][:4], PAPER_TABLE5[name][:4]) for name in ("sasrec", "convrec")}
    lines.append(f"- Table 5's own totals grow with slopes {paper['sasrec']:.2f} (SASRec) and {paper['convrec']:.2f} "
                 f"(ConvRec) over T = 50…600: fixed memory dominates them, and they show no quadratic growth "
                 f"before SASRec fails at 900.")
    shares = [r["loss_s"] / r["step_s"] for r in results.values() if "error" not in r]
    if shares:
        lines.append(f"- The loss alone is {100 * min(shares):.0f}–{100 * max(shares):.0f}% of a step's time.")
    failed = [f"{name} at T = {n}: {result['error'][:80]}" for (name, n), result in results.items()
              if "error" in result]
    lines += [f"- Failed: {failure}" for failure in failed] or [
        f"- Every configuration ran, SASRec at T = {lengths[-1]} included."]
    return (f"**Reading.** Slopes under 1.3 read as linear, over 1.7 as quadratic; times whose timed steps "
            f"differ by more than {MAX_SPREAD}x are not read.\n\n" + "\n".join(lines))


def plot(lengths: list[int], results: dict, path) -> None:
    """Each fitted figure against T, log-log, with slope-1 and slope-2 guides from the lowest point."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, panels = plt.subplots(1, len(FIGURES), figsize=(15, 4))
    for axes, (key, label) in zip(panels, FIGURES.items()):
        scale, unit = (1, "s") if key == "step_s" else (2 ** 30, "GiB")
        for name in MODELS:
            measured = [n for n in lengths if "error" not in results[name, n]]
            axes.plot(measured, [results[name, n][key] / scale for n in measured], "o-", label=name)
        base = np.nanmin([results[name, lengths[0]].get(key, np.nan) / scale for name in MODELS])
        for power, style in ((1, "k:"), (2, "k--")):
            axes.plot(lengths, [base * (n / lengths[0]) ** power for n in lengths], style, label=f"∝ T^{power}")
        axes.set(xscale="log", yscale="log", xlabel="T (steps per sequence)", title=f"{label} ({unit})")
        axes.grid(True, which="both", alpha=0.3)
        axes.legend()
    save_figure(figure, path)


def main(argv: list[str] | None = None) -> None:
    parser = benchmark_parser(__doc__, "tiny sizes: checks the script in seconds",
                              "rewrite the sequence_length section of docs/benchmarks.md and docs/img/sequence_length.png")
    parser.add_argument("--lengths", nargs="+", type=int, help="window lengths T (default 50 200 400 600 900)")
    args = parser.parse_args(argv)
    torch.set_num_threads(THREADS)
    if run_one(args, step_figures):
        return

    plan = dict(QUICK if args.quick else FULL)
    lengths = sorted(args.lengths or plan["lengths"])
    if len(lengths) < 2:
        parser.error("--lengths: a slope needs at least 2 window lengths")
    started = time.perf_counter()
    run = {"date": now_utc(), "command": command_line(), "load_start": load_average(), **machine(),
           **{key: plan[key] for key in ("batch", "num_items", "negatives", "repeats")}}
    emit("machine", **run)
    steal_start = cpu_times()
    results = {}
    for name in MODELS:
        failed_at = None
        for n in lengths:
            if failed_at is None:
                config = {"model": name, "length": n, **plan}
                result = spawn(__file__, config, timeout_s=config["timeout_s"])
                failed_at = n if "error" in result else None
            else:
                # A longer window would fail the same way, after the same wait.
                result = {"error": f"skipped: T = {failed_at} failed"}
            results[name, n] = result
            emit("step", model=name, length=n, batch=plan["batch"], **result)
    fits = slopes(lengths, results)
    for (name, key), value in fits.items():
        emit("slope", model=name, of=key, **value)
    steal_end = cpu_times()
    run.update(load_end=load_average(), wall_min=(time.perf_counter() - started) / 60,
               steal_share=(steal_end[0] - steal_start[0]) / (steal_end[1] - steal_start[1]))
    emit("run_end", **{key: run[key] for key in ("load_end", "wall_min", "steal_share")})
    if args.write_docs:
        replace_section("sequence_length", docs_section(run, lengths, results, fits))
        plot(lengths, results, ROOT / "docs" / "img" / "sequence_length.png")


if __name__ == "__main__":
    main()
