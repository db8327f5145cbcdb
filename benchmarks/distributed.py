"""Data-parallel training on 1 and 2 workers: row-sharded vs replicated item tables.

    python benchmarks/distributed.py [--quick] [--write-docs]

Workers are plain processes joined in one gloo group on 127.0.0.1 (torch.distributed), not Ray
workers: this measures the training step and its collectives, not Ray's scheduling. Every worker is
a fresh interpreter, so its peak RSS (VmHWM) is its own. Each trains HRNN (hidden 128, item
vectors 128) with sampled softmax (K = 2048 shared negatives from count^0.75, the same on every
rank) on its own 256 windows x 32 steps per step (weak scaling), through
dist_rec.train.step.train_step: DDP on the encoder, RowWiseAdagrad on the tables.

- sharded: `sharding: row`, each worker holds every W-th row (ShardedItemTables); lookups and row
  gradients travel by all-to-all; bytes are ShardedItemTables.bytes_sent.
- replicated: `sharding: none`, every worker holds every row; sparse row gradients are averaged by
  all-gathers (embeddings/replicated.py), whose bytes are counted here.
2 workers use 1 thread each; 1 worker runs on 2 threads (the same 2 cores) and on 1 thread.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from datetime import timedelta

import torch
import torch._dynamo  # optimizers import it on first use (~70 MB of RSS): now, not while tables build
import torch.distributed as dist

from common import (BENCHMARKS_MD, NUM_DELTA_BUCKETS, NUM_EVENT_TYPES, NUM_USERS, command_line, emit,
                    load_average, machine, markdown_table, now_utc, replace_section, zipf_workload)
from dist_rec.config import ModelConfig, SamplerConfig
from dist_rec.embeddings.optim import RowWiseAdagrad
from dist_rec.losses import build_loss
from dist_rec.models import Dimensions, build_model
from dist_rec.train.step import Optimizers, train_step

FULL = {"sizes": [1_000_000, 4_000_000], "hidden": 128, "negatives": 2048, "rows": 256, "window": 32,
        "warmup": 1, "repeats": 3, "steps": 2}
QUICK = {"sizes": [10_000], "hidden": 32, "negatives": 128, "rows": 32, "window": 8,
         "warmup": 1, "repeats": 2, "steps": 2}
# (workers, threads per worker, sharding): the whole 2 cores as 1 or 2 workers, and 1 worker on
# 1 thread, the per-worker speed that 2 workers would each keep if the collectives were free.
SETUPS = [(1, 2, "none"), (1, 1, "none"), (2, 1, "row"), (2, 1, "none")]
MEMORY_TARGET = 0.6                                     # sharded / unsharded peak per worker, at 4M


def _status_bytes(field: str) -> int:
    """VmRSS / VmHWM of this process from /proc/self/status (kB there)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


class _GatherCounter:
    """Bytes this rank sends through dist.all_gather (tensor bytes x (W - 1)), for the replicated
    tables' gradient averaging, which keeps no count of its own."""

    def __init__(self):
        self.bytes_sent, self._all_gather = 0, dist.all_gather

    def install(self) -> None:
        def all_gather(outputs, tensor, *args, **kwargs):
            self.bytes_sent += tensor.numel() * tensor.element_size() * (len(outputs) - 1)
            return self._all_gather(outputs, tensor, *args, **kwargs)
        dist.all_gather = all_gather


def worker(config: dict) -> dict:
    """One rank's figures: events/s (timed between barriers), memory and bytes sent per step."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(config["threads"])
    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(minutes=5))
    barrier = dist.barrier if world > 1 else (lambda: None)
    counts, batches = zipf_workload(config["num_items"], config["rows"], config["window"], count=4,
                                   batch_seed=1 + rank)
    loss_fn = build_loss(SamplerConfig(num_negatives=config["negatives"], alpha=0.75), counts)
    rss_before = _status_bytes("VmRSS")

    torch.manual_seed(0)                                  # the same encoder (and replicated rows) everywhere
    model = build_model(ModelConfig(name="hrnn", embedding_dim=config["hidden"], hidden_dim=config["hidden"]),
                        Dimensions(config["num_items"], NUM_USERS, NUM_DELTA_BUCKETS, NUM_EVENT_TYPES),
                        config["sharding"], seed=0)
    optimizers = Optimizers(dense=torch.optim.Adam(model.dense_parameters(), lr=1e-3),
                            sparse=RowWiseAdagrad(model.sparse_parameters(), lr=0.05))
    table_bytes = sum(p.nbytes for p in model.tables.parameters()) + sum(
        optimizers.sparse.state[p]["sum"].nbytes for p in model.tables.parameters())
    rss_tables = _status_bytes("VmRSS") - rss_before
    encoder_bytes = sum(p.nbytes for p in model.encoder.parameters())
    if world > 1:
        model.encoder = torch.nn.parallel.DistributedDataParallel(model.encoder)
    replicated = world > 1 and config["sharding"] == "none"
    gathers = _GatherCounter()
    if replicated:
        gathers.install()
    generator = torch.Generator().manual_seed(0)          # same negatives on every rank

    def sent() -> int:
        return model.tables.bytes_sent if config["sharding"] == "row" else gathers.bytes_sent

    def run(steps: int, first: int) -> None:
        for step in range(first, first + steps):
            train_step(model, batches[step % len(batches)], loss_fn, optimizers, generator,
                       replicated_tables=replicated)

    run(config["warmup"], 0)
    rates, sent_before, step = [], sent(), config["warmup"]
    for _ in range(config["repeats"]):
        barrier()
        started = time.perf_counter()
        run(config["steps"], step)
        barrier()
        rates.append(world * config["steps"] * config["rows"] * config["window"] / (time.perf_counter() - started))
        step += config["steps"]
    timed_steps = config["repeats"] * config["steps"]
    return {"rank": rank, "events_per_s": statistics.median(rates), "runs_events_per_s": rates,
            "bytes_sent_per_step": (sent() - sent_before) / timed_steps,
            # DDP's bucketed all-reduce of the encoder gradient, as a ring sends it.
            "ddp_bytes_per_step": encoder_bytes * 2 * (world - 1) / world,
            "table_bytes": table_bytes, "rss_tables_bytes": rss_tables,
            "peak_rss_bytes": _status_bytes("VmHWM")}


def launch(config: dict, world: int, timeout: float) -> dict:
    """Run `world` fresh worker processes in one gloo group -> the figures of every rank."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world)}
    started = time.perf_counter()
    processes = [subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(config)],
                                  env={**env, "RANK": str(rank)}, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for rank in range(world)]
    try:
        outputs = [process.communicate(timeout=timeout) for process in processes]
    except subprocess.TimeoutExpired:
        for process in processes:
            process.kill()
        return {"error": f"ran past {timeout:.0f} s"}
    failed = [(p.returncode, err) for p, (_, err) in zip(processes, outputs) if p.returncode]
    if failed:
        return {"error": f"exit {failed[0][0]}: {failed[0][1].strip()[-400:]}"}
    ranks = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    return {"events_per_s": ranks[0]["events_per_s"], "ranks": ranks, "wall_s": time.perf_counter() - started}


def available_memory() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/meminfo has no MemAvailable")


def needed_memory(config: dict, world: int) -> int:
    """Tables (input + output + bias + accumulators) on every worker, plus 1 GiB each for the rest."""
    rows = config["num_items"] + 1
    per_worker = rows * (2 * config["hidden"] + 1) * 4 // (world if config["sharding"] == "row" else 1)
    return world * (per_worker + 2 ** 30)


def _gib(value: float) -> str:
    return f"{value / 2 ** 30:.2f} GiB" if value >= 2 ** 30 else f"{value / 2 ** 20:.1f} MiB"


def docs_section(run: dict, plan: dict, results: dict, memory: dict) -> str:
    rows, scaling = [], []
    for (num_items, world, threads, sharding), result in results.items():
        tables = "sharded" if sharding == "row" else ("replicated" if world > 1 else "single")
        if "error" in result:
            rows.append([f"{num_items:,}", world, threads, tables, f"**not measured**: {result['error']}",
                         "", "", "", ""])
            continue
        ranks = result["ranks"]
        rows.append([f"{num_items:,}", world, threads, tables, f"{result['events_per_s']:,.0f}",
                     f"{result['events_per_s'] / world:,.0f}", _gib(max(r["peak_rss_bytes"] for r in ranks)),
                     _gib(max(r["table_bytes"] for r in ranks)),
                     "—" if world == 1 else _gib(max(r["bytes_sent_per_step"] for r in ranks))])
        one = results.get((num_items, 1, 1, "none"), {})
        if world == 2 and "error" not in one:
            scaling.append(f"{tables} {result['events_per_s'] / one['events_per_s']:.2f}x at {num_items:,}")
    table = markdown_table(["items", "workers", "threads per worker", "tables", "events/s (all workers)",
                            "events/s per worker", "peak RSS per worker", "tables + accumulators per worker",
                            "table bytes sent per step per worker"], rows)
    if memory:
        verdict = "met" if memory["peak_ratio"] <= MEMORY_TARGET else "**missed**"
        memory_line = (f"**Memory**, {memory['num_items']:,} items, 2 workers, sharded / replicated, per worker: "
                       f"peak RSS {memory['peak_ratio']:.2f}x ({_gib(memory['sharded_peak'])} vs "
                       f"{_gib(memory['replicated_peak'])}); RSS added by building the tables "
                       f"{memory['rss_tables_ratio']:.2f}x; tables + accumulators {memory['table_ratio']:.2f}x. "
                       f"Target <= {MEMORY_TARGET}x of peak RSS: {verdict}.")
    else:
        memory_line = "**Memory** target not measured: a 2-worker configuration at the largest size failed."
    return f"""## Distributed training: sharded vs replicated item tables

`{run['command']}`, {run['date']}, {run['cpu']}, {run['cores']} cores, {run['memory_gib']} GiB,
torch {run['torch']}. Load average (1 min): {run['load_start']:.2f} at the start, {run['load_end']:.2f} at
the end; the machine is shared, and other jobs' threads take cores from these figures.

Workers are local processes in one **gloo** group on 127.0.0.1 (torch.distributed), **not Ray**
workers. Each trains HRNN (hidden {plan['hidden']}, item vectors {plan['hidden']}) with sampled softmax
(K = {plan['negatives']} shared negatives) on its own {plan['rows']} windows x {plan['window']} steps per
step, through `train_step`: DDP on the encoder, RowWiseAdagrad on the tables. Median of
{plan['repeats']} x {plan['steps']} timed steps after {plan['warmup']} warm-up. 2 workers run 1 thread each
on the 2 cores; 1 worker runs on 2 threads and on 1 thread (what each of 2 workers would do if the
collectives were free), so the 2-worker rows show the cost of the collectives, not a multi-machine
speed-up. Bytes sent: the all-to-all lookups and row gradients of sharded tables
(`ShardedItemTables.bytes_sent`), the sparse-gradient all-gathers of replicated ones; DDP's
all-reduce of the encoder gradient adds {_gib(memory.get('ddp_bytes', 0))} per step per worker to both.

{table}

2 workers / 1 worker on 1 thread (2.00x = free collectives on 2 idle cores): {'; '.join(scaling)}.
Torch's intra-op threads wait for each other at every operation, so 1 worker on 2 threads suffers most
when another job holds a core.

{memory_line}
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small catalogs and batches: checks the script")
    parser.add_argument("--write-docs", action="store_true",
                        help="rewrite the distributed section of docs/benchmarks.md")
    parser.add_argument("--worker", help=argparse.SUPPRESS)   # internal: one rank, in a fresh process
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    plan = QUICK if args.quick else FULL
    run = {"date": now_utc(), "command": command_line(), "load_start": load_average(), **machine()}
    emit("machine", **run)
    results, memory = {}, {}
    for num_items in plan["sizes"]:
        for world, threads, sharding in SETUPS:
            config = {**{k: plan[k] for k in ("hidden", "negatives", "rows", "window", "warmup",
                                              "repeats", "steps")},
                      "num_items": num_items, "threads": threads, "sharding": sharding}
            needed, free = needed_memory(config, world), available_memory()
            result = ({"error": f"skipped: needs ~{_gib(needed)}, {_gib(free)} available"} if needed > free
                      else launch(config, world, timeout=300))
            results[num_items, world, threads, sharding] = result
            emit("train", num_items=num_items, workers=world, threads=threads, sharding=sharding, **result)
    largest = max(plan["sizes"])
    sharded, replicated = results[largest, 2, 1, "row"], results[largest, 2, 1, "none"]
    if "error" not in sharded and "error" not in replicated:
        def worst(result, key):
            return max(r[key] for r in result["ranks"])
        memory = {"num_items": largest, "sharded_peak": worst(sharded, "peak_rss_bytes"),
                  "replicated_peak": worst(replicated, "peak_rss_bytes"),
                  "rss_tables_ratio": worst(sharded, "rss_tables_bytes") / worst(replicated, "rss_tables_bytes"),
                  "table_ratio": worst(sharded, "table_bytes") / worst(replicated, "table_bytes"),
                  "ddp_bytes": sharded["ranks"][0]["ddp_bytes_per_step"]}
        memory["peak_ratio"] = memory["sharded_peak"] / memory["replicated_peak"]
        emit("memory_sharded_vs_replicated", target=MEMORY_TARGET, met=memory["peak_ratio"] <= MEMORY_TARGET,
             **memory)
    run["load_end"] = emit("load_end", value=load_average())["value"]
    if args.write_docs:
        body = docs_section(run, plan, results, memory)
        if BENCHMARKS_MD.exists():
            replace_section("distributed", body, BENCHMARKS_MD)
        else:
            BENCHMARKS_MD.write_text(f"<!-- distributed:start -->\n{body.strip()}\n<!-- distributed:end -->\n")


if __name__ == "__main__":
    main()
