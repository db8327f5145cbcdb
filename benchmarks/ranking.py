"""Full-catalog ranking: seconds of ItemTables.topk and target_ranks, plain and through a row view.

A row view (table.RowView, HRNN-meta's eq. 2 mix) makes the ranking score in float64, so that
bit-identical rows tie exactly; this measures what that costs against the float32 path, with an
identity view so that only the arithmetic differs. Both run in one process, alternating, and the
table quotes their ratio (a shared machine slows both alike).

    python benchmarks/ranking.py --write-docs     # about 2 minutes on 2 cores
    python benchmarks/ranking.py --quick          # seconds: checks the script
"""
from __future__ import annotations

import statistics
import time

import torch

from common import (benchmark_parser, command_line, emit, load_average, machine, markdown_table,
                    now_utc, replace_section)
from dist_rec.embeddings.table import ItemTables

THREADS = 2
FULL = {"catalogs": [100_000, 1_000_000], "queries": 256, "dim": 64, "k": 200, "repeats": 5}
QUICK = {"catalogs": [2_000], "queries": 16, "dim": 8, "k": 20, "repeats": 2}


def identity(ids: torch.Tensor, vectors: torch.Tensor, bias: torch.Tensor):
    return vectors, bias


def measure(num_items: int, plan: dict) -> dict:
    """Median seconds of each call, plain and through the identity view, alternating."""
    torch.manual_seed(0)
    tables = ItemTables(num_items, plan["dim"], plan["dim"])
    hidden = torch.randn(plan["queries"], plan["dim"])
    targets = torch.randint(1, num_items + 1, (plan["queries"],))
    calls = {
        "topk": lambda view: tables.topk(hidden, plan["k"], row_view=view),
        "target_ranks": lambda view: tables.target_ranks(hidden, targets, row_view=view),
    }
    seconds = {(name, view): [] for name in calls for view in ("plain", "row_view")}
    for name, call in calls.items():
        for view in (None, identity):          # warm-up
            call(view)
        for _ in range(plan["repeats"]):
            for label, view in (("plain", None), ("row_view", identity)):
                start = time.perf_counter()
                call(view)
                seconds[name, label].append(time.perf_counter() - start)
    return {f"{name}_{label}_s": statistics.median(values) for (name, label), values in seconds.items()}


def docs_section(run: dict, results: dict) -> str:
    rows = [[f"{n:,}", name, f"{r[f'{name}_plain_s']:.2f}", f"{r[f'{name}_row_view_s']:.2f}",
             f"{r[f'{name}_row_view_s'] / r[f'{name}_plain_s']:.2f}x"]
            for n, r in results.items() for name in ("topk", "target_ranks")]
    return f"""## Ranking: plain vs through a row view

`{run['command']}` on {run['date']}. {run['cpu']}, {run['cores']} cores, torch {run['torch']},
`torch.set_num_threads({THREADS})`; 1-minute load average {run['load_start']:.2f} at the start and
{run['load_end']:.2f} at the end. {run['queries']} queries of dimension {run['dim']} against the whole
catalog (`ItemTables`, chunks of 262,144 rows), top-{run['k']}; median of {run['repeats']} calls, the
two paths alternating. The row view is the identity, so the difference is the float64 scoring that
any row view (HRNN-meta with item features) turns on; every other model ranks on the plain path.

{markdown_table(["items", "call", "plain s", "row view s", "row view / plain"], rows)}
"""


def main(argv: list[str] | None = None) -> None:
    parser = benchmark_parser(__doc__, "tiny sizes: checks the script in seconds",
                              "rewrite the ranking section of docs/benchmarks.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(THREADS)
    plan = QUICK if args.quick else FULL
    run = {"date": now_utc(), "command": command_line(), "load_start": load_average(), **machine(),
           **{key: plan[key] for key in ("queries", "dim", "k", "repeats")}}
    emit("machine", **run)
    results = {}
    for num_items in plan["catalogs"]:
        results[num_items] = measure(num_items, plan)
        emit("ranking", items=num_items, **results[num_items])
    run["load_end"] = load_average()
    if args.write_docs:
        replace_section("ranking", docs_section(run, results))


if __name__ == "__main__":
    main()
