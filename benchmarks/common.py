"""Shared helpers for the benchmark scripts: the machine, JSON lines, timing, and docs/benchmarks.md.

Every script prints one JSON line per figure and, when asked, rewrites only its own section of
docs/benchmarks.md, between `<!-- NAME:start -->` and `<!-- NAME:end -->`, so several scripts share
the file without touching each other's tables.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from dist_rec.batch import SequenceBatch

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS_MD = ROOT / "docs" / "benchmarks.md"
# The synthetic workload's side tables: users, time-gap buckets and event types.
NUM_USERS, NUM_DELTA_BUCKETS, NUM_EVENT_TYPES = 1000, 32, 4


def machine() -> dict:
    """CPU model, bf16 support, cores, memory, GPU (if any) and library versions of this machine."""
    cpu, flags = "unknown", []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu == "unknown":
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = line.split(":", 1)[1].split()
    except OSError:
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"cpu": cpu, "avx512_bf16": "avx512_bf16" in flags, "cores": os.cpu_count(),
            "memory_gib": round(total_memory_bytes() / 2**30, 1), "gpu": gpu,
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "python": platform.python_version()}


def total_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def load_average() -> float:
    """The 1-minute load average: other users of the machine slow every figure down."""
    return os.getloadavg()[0]


def cpu_times() -> tuple[float, float]:
    """(steal, total) CPU seconds since boot from /proc/stat: steal is time the hypervisor gave
    this VM's CPUs to someone else, a slowdown that the load average does not show."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    ticks = os.sysconf("SC_CLK_TCK")
    return fields[7] / ticks, sum(fields[:8]) / ticks


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def command_line() -> str:
    """How this script was invoked, relative to the repository root."""
    script = Path(sys.argv[0]).resolve()
    try:
        script = script.relative_to(ROOT)
    except ValueError:
        pass
    return shlex.join(["python", str(script), *sys.argv[1:]])


def now_utc() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def emit(figure: str, **values) -> dict:
    """Print one figure as a JSON line (flushed: a long run shows progress) and return it."""
    record = {"figure": figure, **values}
    print(json.dumps(record), flush=True)
    return record


def median_rate(work: Callable[[], None], amount: float, repeats: int, warmup: int = 1) -> tuple[float, list[float]]:
    """Run `work` warmup times, then time it `repeats` times -> (median amount/s, every amount/s)."""
    for _ in range(warmup):
        work()
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        rates.append(amount / (time.perf_counter() - start))
    return statistics.median(rates), rates


def synchronize(device: torch.device | str) -> None:
    """Wait for the work queued on `device`, so that a wall-clock timing covers it (CPU: no-op)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def matmul_gflops(size: int = 2048, repeats: int = 5, device: str = "cpu",
                  dtype: torch.dtype = torch.float32) -> float:
    """torch.mm size^3 into a reused output, median GFLOP/s: the device's compute ceiling."""
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    out = torch.empty(size, size, device=device, dtype=dtype)

    def product() -> None:
        torch.mm(a, b, out=out)
        synchronize(device)

    rate, _ = median_rate(product, 2.0 * size ** 3, repeats, warmup=2)
    return rate / 1e9


def replace_section(name: str, body: str, path: Path = BENCHMARKS_MD) -> None:
    """Put `body` between the `name` markers of `path`, appending the section if it is new."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing; it holds the intro every benchmark section sits under")
    text = path.read_text()
    section = f"{start}\n{body.strip()}\n{end}"
    counts = text.count(start), text.count(end)
    if counts == (1, 1) and text.index(start) < text.index(end):
        before, rest = text.split(start, 1)
        text = before + section + rest.split(end, 1)[1]
    elif counts == (0, 0):
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    else:
        raise ValueError(f"{path}: markers of section {name!r} are broken; expected one "
                         f"{start!r} followed by one {end!r}, found {counts[0]} and {counts[1]}")
    path.write_text(text)


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def zipf_workload(num_items: int, rows: int, window: int, count: int, batch_seed: int,
                  exponent: float = 1.0) -> tuple[np.ndarray, list[SequenceBatch]]:
    """Item popularity ∝ rank^-exponent -> counts (C+1,) (row 0 = padding) and `count` batches of
    (rows, window) events drawn from it with `batch_seed`. The popular items are scattered over the
    table by a fixed permutation (as after a vocabulary, and so over the shards), the same for
    every batch seed: ranks of one distributed run share counts and draw their own batches."""
    popularity = np.arange(1, num_items + 1, dtype=np.float64) ** -exponent
    ids = np.random.default_rng(0).permutation(num_items) + 1
    counts = np.zeros(num_items + 1)
    counts[ids] = popularity
    cdf = np.cumsum(popularity) / popularity.sum()
    rng = np.random.default_rng(batch_seed)
    positions = np.minimum(np.searchsorted(cdf, rng.random((count, rows, window + 1))), num_items - 1)
    shape = (rows, window)
    batches = [SequenceBatch.from_numpy({
        "items": sequence[:, :-1], "targets": sequence[:, 1:],
        "deltas": rng.integers(1, NUM_DELTA_BUCKETS, shape), "session_starts": rng.random(shape) < 0.1,
        "event_types": rng.integers(1, NUM_EVENT_TYPES + 1, shape),
        "target_types": rng.integers(1, NUM_EVENT_TYPES + 1, shape),
        "users": rng.integers(1, NUM_USERS + 1, rows)}) for sequence in ids[positions]]
    return counts, batches


def benchmark_parser(doc: str, quick_help: str, docs_help: str) -> argparse.ArgumentParser:
    """The flags every benchmark script shares: --quick, --write-docs and the internal --one."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--write-docs", action="store_true", help=docs_help)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: one configuration, in a fresh process
    return parser


def run_one(args: argparse.Namespace, measure: Callable[[dict], dict]) -> bool:
    """In a --one child: measure the JSON configuration, print the result as JSON, return True."""
    if not args.one:
        return False
    print(json.dumps(measure(json.loads(args.one))))
    return True


def spawn(script: str, config: dict, timeout_s: float | None = None) -> dict:
    """Run `script --one config` in a fresh interpreter, so its peak RSS is its own; a crash or a
    timeout becomes an {"error": ...} entry (exit -9 is most likely the out-of-memory killer)."""
    started = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, script, "--one", json.dumps(config)],
                              capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"ran past {timeout_s} s"}
    if done.returncode != 0:
        return {"error": f"exit {done.returncode}: {done.stderr.strip()[-500:]}"}
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "wall_s": time.perf_counter() - started}


def save_figure(figure, path: Path) -> None:
    """Lay out, write (100 dpi, creating the folder) and close a matplotlib figure."""
    import matplotlib.pyplot as plt
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)


def train_on_random_batches(model, windows: SequenceBatch, counts: np.ndarray, steps: int,
                            batch: int, negatives: int, seed: int) -> float:
    """`steps` train_steps of `model` on `batch` windows drawn at random from `windows`: sampled
    softmax (K = negatives, q from `counts`), Adam (3e-3) on the encoder, row-wise Adagrad (0.1)
    on the item tables. The draws depend on `seed` alone, so every model of one run sees the same
    batches. Returns the wall seconds; the model is left in eval mode."""
    from dist_rec.config import SamplerConfig
    from dist_rec.embeddings.optim import RowWiseAdagrad
    from dist_rec.losses import build_loss
    from dist_rec.train.step import Optimizers, train_step

    loss_fn = build_loss(SamplerConfig(num_negatives=negatives), counts)
    optimizers = Optimizers(dense=torch.optim.Adam(model.dense_parameters(), lr=3e-3),
                            sparse=RowWiseAdagrad(model.sparse_parameters(), lr=0.1))
    generator, rng = torch.Generator().manual_seed(seed), np.random.default_rng(seed)
    started = time.perf_counter()
    model.train()
    for _ in range(steps):
        rows = torch.as_tensor(rng.integers(0, len(windows.items), batch))
        train_step(model, windows[rows], loss_fn, optimizers, generator)
    model.eval()
    return time.perf_counter() - started
