"""GPU: the training path on one CUDA device, checked against the CPU, then timed.

    python benchmarks/gpu.py [--quick] [--device cuda] [--parts checks,catalog,gru4rec,lengths]
                             [--sizes 10k 1M] [--write-docs]
    python benchmarks/gpu.py --render benchmarks/results/gpu.jsonl   # docs from a run's raw lines

One process on one device, what a Ray Train GPU worker runs (`--device cpu --quick` checks the
script on a machine without one). fp32 means fp32: TF32 is off for matmuls and cuDNN.
1. Checks, each a number against the bound it must meet (the script exits 1 if one misses):
   - HRNN train_steps (full softmax, Adam + row-wise Adagrad) from the same weights on the CPU and
     on the device: the largest difference in the losses and in the updated parameters;
   - the alias sampler drawing on the device: chi-square of 2^22 draws over 1,000 items against q;
   - evaluation on the device: full-catalog top-20 lists and target ranks against the CPU's;
   - ShardedItemTables and a DDP encoder in a one-rank NCCL group (gloo on the CPU) against plain
     ItemTables: the losses of importance-sampled steps;
   - bf16 autocast: the mean loss of the last 10 of 60 importance-sampled steps against fp32's (within 5%).
2. HRNN with importance-sampled (IS) vs dense softmax at 10k to 16M items (large_catalog's
   train_figures on the device): events/s and peak allocated memory, batches of 256 windows x 32
   (the CPU section's) and of 2048; fp32 and bf16 autocast. Floors: torch.mm 8192^3 per dtype.
3. Our GRU4Rec at the official code's two settings (hidden / session-parallel rows 480/48, 512/240).
4. ConvRec, DynamicRec and SASRec against the window length T (sequence_length's step_figures on
   the device): seconds per step and the allocator's peak bytes above the built model.
"""
from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import large_catalog
import sequence_length
from common import (BENCHMARKS_MD, NUM_DELTA_BUCKETS, NUM_EVENT_TYPES, NUM_USERS, ROOT, benchmark_parser, command_line, emit,
                    machine, markdown_table, matmul_gflops, now_utc, replace_section, save_figure, zipf_workload)
from dist_rec.config import ModelConfig, SamplerConfig
from dist_rec.embeddings.optim import RowWiseAdagrad
from dist_rec.embeddings.sharded import ShardedItemTables
from dist_rec.embeddings.table import ItemTables
from dist_rec.losses import build_loss
from dist_rec.models import Dimensions, build_model
from dist_rec.sampling.alias import AliasSampler
from dist_rec.train.step import Optimizers, train_step

FULL = {"sizes": [10_000, 100_000, 1_000_000, 4_000_000, 16_000_000], "batches": [256, 2048],
        "gru4rec": large_catalog.GRU4REC, "gru4rec_items": 1_000_000, "steps": 6, "repeats": 3, "matmul": 8192,
        "dense_repeat_s": 2.0,
        "lengths": [50, 200, 400, 600, 900], "sequence": {"batch": 128, "num_items": 10_000, "negatives": 100,
                                                          "repeats": 3}}
QUICK = {"sizes": [1_000, 10_000], "batches": [32], "gru4rec_items": 10_000,
         "gru4rec": [(64, 8, None), (64, 16, None)], "steps": 2, "repeats": 2,   # no official figure
         "dense_repeat_s": 0.05,   # the plumbing only
         "matmul": 512, "lengths": [8, 16], "sequence": {"batch": 8, "num_items": 1_000, "negatives": 16,
                                                          "repeats": 1}}
PARTS = ("checks", "catalog", "gru4rec", "lengths")
DENSE_BLOCK_BYTES = 8 * 2 ** 30       # a GPU has the memory for bigger blocks of dense logits
RESULTS = ROOT / "benchmarks" / "results" / "gpu.jsonl"   # the raw lines of the docs' run, tracked
DOCS, IMAGE = BENCHMARKS_MD, ROOT / "docs" / "img" / "gpu.png"
CHECK_DIMS = Dimensions(1_000, NUM_USERS, NUM_DELTA_BUCKETS, NUM_EVENT_TYPES)
CHECK_MODEL = ModelConfig(name="hrnn", embedding_dim=32, hidden_dim=32)


# ------------------------------------------------------------------------------------ checks

def _check_setup(loss: str, device: str, seed: int = 0):
    """A small HRNN (same weights for a seed), its loss and optimizers, on `device`."""
    torch.manual_seed(seed)
    model = build_model(CHECK_MODEL, CHECK_DIMS).to(device)
    counts, _ = zipf_workload(CHECK_DIMS.num_items, 1, 1, 1, batch_seed=0)
    loss_fn = build_loss(SamplerConfig(loss=loss, num_negatives=256), counts).to(device)
    optimizers = Optimizers(dense=torch.optim.Adam(model.dense_parameters(), lr=1e-2),
                            sparse=RowWiseAdagrad(model.sparse_parameters(), lr=0.1))
    return model, loss_fn, optimizers


def _check_batches(count: int, device: str) -> list:
    _, batches = zipf_workload(CHECK_DIMS.num_items, 64, 16, count, batch_seed=1)
    return [batch.to(device) for batch in batches]


def check_train_step(device: str) -> dict:
    """Three full-softmax steps on the CPU and on `device` from the same weights."""
    runs = []
    for where in ("cpu", device):
        model, loss_fn, optimizers = _check_setup("full_softmax", where)
        generator = torch.Generator(device=where).manual_seed(0)
        losses = [train_step(model, batch, loss_fn, optimizers, generator) for batch in _check_batches(3, where)]
        runs.append((np.array(losses), {k: v.detach().cpu() for k, v in model.state_dict().items()}))
    (cpu_losses, cpu_state), (device_losses, device_state) = runs
    return {"loss": float(np.abs(cpu_losses - device_losses).max()),
            "parameters": max(float((cpu_state[k] - device_state[k]).abs().max()) for k in cpu_state)}


def check_sampler(device: str, num_items: int = 1_000, draws: int = 2 ** 22) -> dict:
    """Chi-square of alias draws on `device` against q ∝ count^0.75, as a z-score (df large)."""
    counts = np.random.default_rng(0).integers(1, 1_000, num_items + 1).astype(float)
    counts[0] = 0
    sampler = AliasSampler.from_counts(counts, 0.75).to(device)
    generator = torch.Generator(device=device).manual_seed(0)
    observed = torch.bincount(sampler.sample(draws, generator), minlength=num_items + 1).cpu().numpy()[1:]
    q = counts[1:] ** 0.75 / (counts[1:] ** 0.75).sum()
    chi2 = float(((observed - draws * q) ** 2 / (draws * q)).sum())
    df = num_items - 1
    return {"chi2": chi2, "df": df, "z": (chi2 - df) / np.sqrt(2 * df), "padding_draws": int(draws - observed.sum())}


def check_evaluation(device: str, num_items: int = 20_000, queries: int = 512, k: int = 20) -> dict:
    """Top-k lists (seen items excluded) and target ranks on `device` against the CPU's."""
    torch.manual_seed(0)
    tables = ItemTables(num_items, 32, 32)
    hidden = torch.randn(queries, 32)
    exclude = torch.randint(0, num_items + 1, (queries, 10))
    targets = torch.randint(1, num_items + 1, (queries,))
    cpu_top = tables.topk(hidden, k, exclude=exclude)[1]
    cpu_ranks = tables.target_ranks(hidden, targets)
    tables = tables.to(device)
    device_top = tables.topk(hidden.to(device), k, exclude=exclude.to(device))[1].cpu()
    device_ranks = tables.target_ranks(hidden.to(device), targets.to(device)).cpu()
    return {"same_top_lists": float((cpu_top == device_top).all(1).float().mean()),
            "rank_difference": int((cpu_ranks - device_ranks).abs().max())}


def check_sharded(device: str, steps: int = 5) -> dict:
    """Importance-sampled steps with ShardedItemTables and a DDP encoder in a one-rank group of
    the device's backend, against plain ItemTables: the largest loss difference."""
    backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        runs = []
        for sharded in (False, True):
            model, loss_fn, optimizers = _check_setup("sampled_softmax", device)
            if sharded:
                model.tables = ShardedItemTables.from_full(model.tables)
                optimizers.sparse = RowWiseAdagrad(model.sparse_parameters(), lr=0.1)
                model.encoder = DistributedDataParallel(model.encoder)
            generator = torch.Generator(device=device).manual_seed(0)
            runs.append(np.array([train_step(model, batch, loss_fn, optimizers, generator)
                                  for batch in _check_batches(steps, device)]))
    finally:
        dist.destroy_process_group()
    return {"backend": backend, "loss": float(np.abs(runs[0] - runs[1]).max())}


def check_bf16(device: str, steps: int = 60) -> dict:
    """|mean loss of the last 10 IS steps under bf16 autocast / fp32's - 1|."""
    batches = _check_batches(4, device)
    tails = []
    for bf16 in (False, True):
        model, loss_fn, optimizers = _check_setup("sampled_softmax", device)
        generator = torch.Generator(device=device).manual_seed(0)
        losses = [train_step(model, batches[i % 4], loss_fn, optimizers, generator, bf16=bf16) for i in range(steps)]
        tails.append(float(np.mean(losses[-10:])))
    return {"fp32": tails[0], "bf16": tails[1], "drift": abs(tails[1] / tails[0] - 1)}


# (name, the figure, bound, how it passes); the bounds leave room for rounding, not for bugs.
CHECKS = [
    ("train_step", check_train_step, "loss", 1e-4, "≤"),
    ("train_step", None, "parameters", 1e-4, "≤"),
    ("alias sampler", check_sampler, "z", 4.0, "≤"),
    ("alias sampler", None, "padding_draws", 0, "≤"),
    ("evaluation", check_evaluation, "same_top_lists", 0.99, "≥"),
    ("evaluation", None, "rank_difference", 2, "≤"),
    ("sharded + DDP", check_sharded, "loss", 1e-5, "≤"),
    ("bf16 autocast", check_bf16, "drift", 0.05, "≤"),
]


def run_checks(device: str) -> list[dict]:
    rows, results = [], {}
    for name, check, key, bound, sense in CHECKS:
        if check is not None:
            results[name] = check(device)
        value = results[name][key]
        passed = value <= bound if sense == "≤" else value >= bound
        rows.append(emit("check", name=name, measure=key, value=value, bound=bound, sense=sense, passed=bool(passed),
                         details=results[name]))
    return rows


# ------------------------------------------------------------------------------------ timings

def catalog_timings(device: str, plan: dict, gflops: dict) -> list[dict]:
    """HRNN, IS vs dense softmax, per catalog size and batch: one JSON line each."""
    records = []
    for num_items in plan["sizes"]:
        for batch in plan["batches"]:
            base = {**large_catalog.HRNN, "batch": batch, "num_items": num_items, "seed": 0, "device": device}
            losses = ["is", "dense"] if batch == plan["batches"][0] else ["is"]
            for loss in losses:
                for bf16 in ((False, True) if loss == "is" else (False,)):
                    if loss == "is":
                        steps = {"warmup": 1, "repeats": plan["repeats"], "steps": plan["steps"]}
                    else:
                        estimate = batch * large_catalog.WINDOW * large_catalog.flops_per_event(
                            large_catalog.hrnn_input_dim(), base["hidden"], num_items, base["hidden"]) / (
                            gflops["fp32"] * 1e9)
                        steps = large_catalog.dense_plan(estimate, plan["repeats"],
                                                         plan["dense_repeat_s"])
                    config = {**base, "loss": loss, "bf16": bf16, "dense_block_bytes": DENSE_BLOCK_BYTES, **steps}
                    records.append(emit("train", loss=loss, batch=batch, bf16=bf16, num_items=num_items,
                                        timed_steps=steps["repeats"] * steps["steps"],
                                        **_guarded(large_catalog.train_figures, config)))
    return records


def gru4rec_timings(device: str, plan: dict) -> list[dict]:
    """Our GRU4Rec at the official code's settings, fp32 and bf16: one JSON line each."""
    records = []
    for hidden, rows, _ in plan["gru4rec"]:
        for bf16 in (False, True):
            config = {"model": "gru4rec", "hidden": hidden, "embedding": hidden, "tied": True, "batch": rows,
                      "num_items": plan["gru4rec_items"], "seed": 0, "loss": "is", "bf16": bf16, "device": device,
                      "warmup": 1, "repeats": plan["repeats"], "steps": plan["steps"]}
            records.append(emit("gru4rec", hidden=hidden, rows=rows, bf16=bf16,
                                **_guarded(large_catalog.train_figures, config)))
    return records


def length_timings(device: str, plan: dict) -> list[dict]:
    """ConvRec, DynamicRec and SASRec per window length T: one JSON line each."""
    return [emit("step", model=name, length=n, **_guarded(sequence_length.step_figures,
                                                           {"model": name, "length": n, "device": device,
                                                            **plan["sequence"]}))
            for name in sequence_length.MODELS for n in plan["lengths"]]


def _guarded(measure, config: dict) -> dict:
    """measure(config), or {"error": ...} when the device runs out of memory."""
    try:
        return measure(config)
    except torch.OutOfMemoryError as error:
        return {"error": f"out of memory: {str(error).splitlines()[0]}"}
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------ docs

def _rate(result: dict, key: str = "events_per_s") -> str:
    return "—" if result is None or "error" in result else f"{result[key]:,.0f}"


def _shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _times(ratio: float) -> str:
    return f"{ratio:.2f}x" if ratio < 10 else f"{ratio:,.0f}x"


def _gib(result: dict | None, key: str) -> str:
    return "—" if result is None or "error" in result or key not in result else f"{result[key] / 2 ** 30:.2f} GiB"


def collect(records: list[dict]) -> dict:
    """A run's JSON lines -> its figures, keyed as the docs read them (later lines win)."""
    run = {"gflops": {}, "checks": [], "train": {}, "gru4rec": {}, "lengths": {}}
    for r in records:
        kind = r["figure"]
        if kind == "machine":
            run.update({k: v for k, v in r.items() if k != "figure"})
        elif kind == "matmul_gflops":
            run["gflops"][r["dtype"]], run["matmul"] = r["value"], r["size"]
        elif kind == "check":
            run["checks"].append(r)
        elif kind == "train":
            run["train"][r["loss"], r["batch"], r["bf16"], r["num_items"]] = r
        elif kind == "gru4rec":
            run["gru4rec"][r["hidden"], r["rows"], r["bf16"]] = r
        elif kind == "step":
            run["lengths"][r["model"], r["length"]] = r
        elif kind == "run_end":
            run["wall_min"] = r["wall_min"]
    return run


def docs_section(records: list[dict]) -> str:
    run = collect(records)
    missing = [name for name, present in (("machine", "gpu" in run), ("matmul", len(run["gflops"]) == 2),
                                          ("checks", run["checks"]), ("catalog", run["train"]),
                                          ("gru4rec", run["gru4rec"]), ("lengths", run["lengths"])) if not present]
    if missing:
        raise ValueError(f"gpu docs: the run's lines lack {', '.join(missing)} (a run cut short, or --parts): "
                         "the section shows every part")
    checks, train, gru, lengths = run["checks"], run["train"], run["gru4rec"], run["lengths"]
    sizes = sorted({key[3] for key in train})
    batches = sorted({key[1] for key in train})
    small, large = batches[0], batches[-1]
    # Lines written before the machine line carried the plan came from the plain command: FULL.
    plan = run.get("plan", FULL)
    window_lengths = sorted({key[1] for key in lengths})
    sequence = plan["sequence"]
    sharded_backend = next(c["details"]["backend"] for c in checks if c["name"] == "sharded + DDP")
    check_rows = [[c['name'], c['measure'], f"{c['value']:.3g}", f"{c['sense']} {c['bound']:g}",
                   "passed" if c["passed"] else "**failed**"] for c in checks]
    hidden = large_catalog.HRNN["hidden"]
    floor_events = {dtype: run["gflops"][dtype] * 1e9 / large_catalog.flops_per_event(
        large_catalog.hrnn_input_dim(), hidden, large_catalog.NEGATIVES, hidden) for dtype in ("fp32", "bf16")}
    train_rows = []
    for n in sizes:
        get = lambda loss, batch, bf16: train.get((loss, batch, bf16, n), {"error": "not run"})
        is_small, dense = get("is", small, False), get("dense", small, False)
        ratio = "—" if "error" in is_small or "error" in dense else _times(is_small["events_per_s"] / dense["events_per_s"])
        train_rows.append([f"{n:,}", _rate(is_small), _rate(get("is", small, True)), _rate(get("is", large, False)),
                           _rate(get("is", large, True)), _gib(get("is", large, False), "peak_device_bytes"),
                           _rate(dense), _gib(dense, "peak_device_bytes"), ratio])
    official = {(h, r): events for h, r, events in large_catalog.GRU4REC}
    gru_rows = [[f"{h} / {r}", _rate(gru.get((h, r, False))), _rate(gru.get((h, r, True))),
                 f"{official[h, r]:,.0f}" if (h, r) in official else "— (not an official setting)"]
                for h, r in sorted({key[:2] for key in gru})]
    length_rows = [[name, n, "—" if "error" in res else f"{res['step_s'] * 1e3:.1f}",
                    "—" if "error" in res else f"{res['loss_s'] * 1e3:.1f}", _gib(res, "saved_bytes"),
                    _gib(res, "device_growth_bytes"), res.get("error", "")]
                   for (name, n), res in lengths.items()]
    slope_rows = []
    for name in sequence_length.MODELS:
        fits = []
        for key in ("step_s", "device_growth_bytes"):
            points = [(n, lengths[name, n][key]) for n in window_lengths
                      if key in lengths.get((name, n), {})]
            fits += [sequence_length.slope(*zip(*points)) if len(points) > 1 else float("nan"),
                     sequence_length.slope(*zip(*points[-2:])) if len(points) > 1 else float("nan")]
        slope_rows.append([name, *(f"{fit:.2f}" for fit in fits)])
    return f"""## GPU: one {run['gpu']}

`{run['command']}` on {run['date']}. {run['gpu']}, torch {run['torch']}, {run['cores']} CPU cores. One
process on one device, what a Ray Train GPU worker runs. fp32 means fp32 (TF32 off for matmuls and
cuDNN); bf16 rows use `train_step(bf16=True)` (autocast on the encoder, the loss in fp32).{
f" The run took {run['wall_min']:.1f} minutes." if "wall_min" in run else ""} Raw figures: `{_shown(RESULTS)}`. torch.mm {run['matmul']}³: {run['gflops']['fp32'] / 1e3:,.1f} TFLOP/s fp32,
{run['gflops']['bf16'] / 1e3:,.1f} TFLOP/s bf16. Peak memory is `torch.cuda.max_memory_allocated` (what the
tensors held, not the allocator's cache).

### Checks: the device computes what the CPU computes

{markdown_table(["check", "figure", "measured", "bound", ""], check_rows)}

`train_step`: the largest difference in 3 full-softmax steps' losses and in every parameter after
them, CPU against device, same initial weights. Alias sampler: chi-square z-score of 2^22 draws
drawn on the device over 1,000 items against q ∝ count^0.75 (a wrong table is off by thousands), and
draws of the padding row 0. Evaluation: top-20 over 20,000 items with seen items excluded, the
share of 512 lists identical to the CPU's, and the largest difference of a target's rank. Sharded +
DDP: 5 importance-sampled steps with `ShardedItemTables` and a `DistributedDataParallel` encoder in a
one-rank **{sharded_backend}** group against plain tables. bf16: the mean loss of the last 10 of 60
steps over fp32's (a ratio; "drift" = its distance from 1).

### HRNN: importance-sampled (IS) vs dense softmax

Hidden 128, item vectors 128, windows of {large_catalog.WINDOW} steps, K = {large_catalog.NEGATIVES} shared
negatives from count^0.75 with log-Q correction; dense: every event against every item, blocked
over events ({DENSE_BLOCK_BYTES // 2 ** 30} GiB of logits per block). Events/s: median of {plan['repeats']} timed
repeats of {plan['steps']} steps for IS; dense repeats sized to its step time (`large_catalog.dense_plan`);
each repeat's rate is in the raw lines.

| items | IS {small} rows fp32 | IS {small} rows bf16 | IS {large} rows fp32 | IS {large} rows bf16 | IS {large} rows peak memory | dense {small} rows fp32 | dense peak memory | IS / dense ({small} rows, fp32) |
|---|---|---|---|---|---|---|---|---|
""" + "\n".join("| " + " | ".join(row) + " |" for row in train_rows) + f"""

The IS compute floor (FLOPs per event = {large_catalog.FLOPS_FORMULA}; HRNN I = {large_catalog.hrnn_input_dim()},
H = D = 128, S = {large_catalog.NEGATIVES}) is {floor_events['fp32']:,.0f} events/s in fp32 and
{floor_events['bf16']:,.0f} in bf16 at this run's matmul rates.

![events/s against catalog size on the GPU](img/gpu.png)

### GRU4Rec

Our `gru4rec`, tied item vectors of the hidden size, K = {large_catalog.NEGATIVES}, {plan['gru4rec_items']:,} items,
session-parallel rows × {large_catalog.WINDOW} steps; the full plan runs the official code's two settings
(480 / 48 and 512 / 240). The official figures are its CPU ones (`../shared/DESIGN.md`, beside
the repository, not in it); its GPU figures are
not known here.

{markdown_table(["hidden / rows", "ours fp32 events/s", "ours bf16 events/s", "official (CPU) events/s"], gru_rows)}

### Sequence length on the GPU: ConvRec, DynamicRec, SASRec

The CPU section's setting (`recommended_config()`, batch {sequence['batch']} sequences of T steps, sampled
softmax over K = {sequence['negatives']} from {sequence['num_items']:,} items, fp32). Milliseconds per step:
median of {sequence['repeats']} timed steps after a warm-up step. "Device growth": the allocator's peak
during the steps minus what was allocated once everything was built.

{markdown_table(["model", "T", "ms / step", "loss alone ms", "saved for backward", "device growth", "error"], length_rows)}

Log-log slopes (1 = linear in T, 2 = quadratic), over every T and between the two largest:

{markdown_table(["model", "time, all T", "time, last two", "device growth, all T", "device growth, last two"], slope_rows)}

ConvRec's Table 5, the memory (GB) its authors measured at T = {', '.join(map(str, sequence_length.PAPER_TABLE5['lengths']))}
(device and batch not named; "Failed" = out of memory): SASRec {_paper_row('sasrec')}; ConvRec {_paper_row('convrec')}.
"""


def _paper_row(name: str) -> str:
    return " / ".join("Failed" if gb is None else f"{gb:g}" for gb in sequence_length.PAPER_TABLE5[name])


def plot(run: dict, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    train = run["train"]
    sizes, batches = sorted({key[3] for key in train}), sorted({key[1] for key in train})
    figure, axes = plt.subplots(figsize=(6.5, 4))
    series = [("is", batches[-1], True, f"IS, {batches[-1]} rows, bf16"),
              ("is", batches[-1], False, f"IS, {batches[-1]} rows, fp32"),
              ("is", batches[0], False, f"IS, {batches[0]} rows, fp32"),
              ("dense", batches[0], False, f"dense, {batches[0]} rows, fp32")]
    for loss, batch, bf16, label in series:
        points = [(n, train[loss, batch, bf16, n]["events_per_s"]) for n in sizes
                  if "error" not in train.get((loss, batch, bf16, n), {"error": "not run"})]
        if points:
            axes.plot(*zip(*points), marker="o", label=label)
    axes.set(xscale="log", yscale="log", xlabel="catalog size (items)", ylabel="training events/s",
             title=f"HRNN training on one {run['gpu']}")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    save_figure(figure, path)


def measure(args: argparse.Namespace) -> list[dict]:
    """This run's JSON lines: the machine and its plan, matmul rates, checks, timings, run end."""
    torch.backends.cuda.matmul.allow_tf32 = False      # fp32 means fp32
    torch.backends.cudnn.allow_tf32 = False
    plan = QUICK if args.quick else FULL
    plan = {**plan, "sizes": sorted(args.sizes or plan["sizes"])}
    parts = args.parts.split(",")
    started = time.perf_counter()
    run = {"date": now_utc(), "command": command_line(), **machine()}
    run["gpu"] = run["gpu"] if args.device.startswith("cuda") else f"CPU ({run['cpu']})"
    records = [emit("machine", **run, plan=plan)]
    gflops = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        records.append(emit("matmul_gflops", dtype=name, size=plan["matmul"],
                            value=matmul_gflops(plan["matmul"], 5, args.device, dtype)))
        gflops[name] = records[-1]["value"]
    if "checks" in parts:
        records += run_checks(args.device)
    if "catalog" in parts:
        records += catalog_timings(args.device, plan, gflops)
    if "gru4rec" in parts:
        records += gru4rec_timings(args.device, plan)
    if "lengths" in parts:
        records += length_timings(args.device, plan)
    return records + [emit("run_end", wall_min=(time.perf_counter() - started) / 60)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = benchmark_parser(__doc__, "tiny sizes: checks the script in seconds (e.g. with --device cpu)",
                              f"write the raw lines to {_shown(RESULTS)} and rewrite the gpu section "
                              "of docs/benchmarks.md and docs/img/gpu.png")
    parser.add_argument("--device", default="cuda", help="torch device (default cuda)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {', '.join(PARTS)} (default all)")
    parser.add_argument("--sizes", nargs="+", type=large_catalog.parse_count,
                        help="catalog sizes of the catalog part (default 10k 100k 1M 4M 16M)")
    parser.add_argument("--render", type=Path, metavar="JSONL",
                        help="measure nothing: rewrite the docs from a run's raw lines (e.g. from a GPU machine)")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.parts.split(",")) - set(PARTS))
    if unknown:
        parser.error(f"--parts: unknown {unknown}; known: {', '.join(PARTS)}")
    if args.write_docs and (args.parts != ",".join(PARTS) or args.sizes):
        parser.error("--write-docs: the docs section shows every part at the default sizes; drop --parts and --sizes")
    if not args.render and args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here; --device cpu --quick checks the script")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        # Only the JSON lines: a captured stdout may hold warnings too.
        records = [json.loads(line) for line in args.render.read_text().splitlines() if line.startswith("{")]
    else:
        records = measure(args)
    if args.write_docs or args.render:
        replace_section("gpu", docs_section(records), DOCS)
        plot(collect(records), IMAGE)
    if args.write_docs:
        RESULTS.write_text("".join(json.dumps(record) + "\n" for record in records))
    failed = [f"{c['name']} {c['measure']} = {c['value']:.3g} (bound {c['sense']} {c['bound']:g})"
              for c in collect(records)["checks"] if not c["passed"]]
    if failed:
        print("checks failed: " + "; ".join(failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
