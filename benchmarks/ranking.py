"""Full-catalog ranking: what float64 scoring costs against float32, for topk and target_ranks.

Bit-identical rows must tie exactly, which float32 cannot promise (a matmul and a row-wise sum
round apart). So target_ranks always compares in float64 with a slack, and topk scores in float64
through a row view (table.RowView, HRNN-meta's eq. 2 mix; here the identity, so that only the
arithmetic differs). Against them: topk without a row view (float32, every other model's path)
and a bare float32 count of the items at or above the target (what target_ranks did before it
kept the tie rule for twins). Both sides run in one process, alternating, and the table quotes
their ratio (a shared machine slows both alike). A third top-k form leaves cold items out
(`table.WithoutItems`), which keeps float32.

    python benchmarks/ranking.py --write-docs     # about 2 minutes on 2 cores
    python benchmarks/ranking.py --quick          # seconds: checks the script
"""
from __future__ import annotations

import statistics
import time

import torch

from common import (benchmark_parser, command_line, emit, load_average, machine, markdown_table,
                    now_utc, replace_section)
from dist_rec.embeddings.table import ItemTables, WithoutItems

THREADS = 2
FULL = {"catalogs": [100_000, 1_000_000], "queries": 256, "dim": 64, "k": 200, "repeats": 5}
QUICK = {"catalogs": [2_000], "queries": 16, "dim": 8, "k": 20, "repeats": 2}
COLD_SHARE = 0.1


def identity(ids: torch.Tensor, vectors: torch.Tensor, bias: torch.Tensor):
    return vectors, bias


def float32_ranks(tables: ItemTables, hidden: torch.Tensor, targets: torch.Tensor,
                  chunk_rows: int = 262_144) -> torch.Tensor:
    """The baseline: #{j != target : float32 score_j >= the target's row-wise float32 score}."""
    weight, bias = tables.output_weight()
    reference = (hidden * weight[targets]).sum(-1) + bias[targets]
    ranks = torch.zeros_like(targets)
    for start in range(1, tables.num_items + 1, chunk_rows):
        stop = min(start + chunk_rows, tables.num_items + 1)
        above = torch.addmm(bias[start:stop], hidden, weight[start:stop].t()) >= reference.unsqueeze(1)
        # Not the target's own column, which the matmul may round either side of the reference.
        inside = (targets >= start) & (targets < stop)
        above[inside.nonzero().squeeze(1), targets[inside] - start] = False
        ranks += above.sum(1)
    return ranks


def measure(num_items: int, plan: dict) -> dict:
    """Median seconds of each call, its float32 and float64 forms alternating."""
    torch.manual_seed(0)
    tables = ItemTables(num_items, plan["dim"], plan["dim"])
    hidden = torch.randn(plan["queries"], plan["dim"])
    targets = torch.randint(1, num_items + 1, (plan["queries"],))
    cold = torch.rand(num_items + 1) < COLD_SHARE
    cold[0] = False
    calls = {
        ("topk", "float32"): lambda: tables.topk(hidden, plan["k"]),
        ("topk", "float64"): lambda: tables.topk(hidden, plan["k"], row_view=identity),
        ("topk", "cold"): lambda: tables.topk(hidden, plan["k"], row_view=WithoutItems(cold)),
        ("target_ranks", "float32"): lambda: float32_ranks(tables, hidden, targets),
        ("target_ranks", "float64"): lambda: tables.target_ranks(hidden, targets),
    }
    seconds = {key: [] for key in calls}
    for name in ("topk", "target_ranks"):
        forms = [form for call, form in calls if call == name]
        for form in forms:       # warm-up
            calls[name, form]()
        for _ in range(plan["repeats"]):
            for form in forms:
                start = time.perf_counter()
                calls[name, form]()
                seconds[name, form].append(time.perf_counter() - start)
    return {f"{name}_{form}_s": statistics.median(values)
            for (name, form), values in seconds.items()}


def docs_section(run: dict, results: dict) -> str:
    rows = [[f"{n:,}", name, f"{r[f'{name}_float32_s']:.2f}", f"{r[f'{name}_float64_s']:.2f}",
             f"{r[f'{name}_float64_s'] / r[f'{name}_float32_s']:.2f}x"]
            for n, r in results.items() for name in ("topk", "target_ranks")]
    cold_rows = [[f"{n:,}", f"{r['topk_float32_s']:.2f}", f"{r['topk_cold_s']:.2f}",
                  f"{r['topk_cold_s'] / r['topk_float32_s']:.2f}x"] for n, r in results.items()]
    return f"""## Ranking: float64 (exact ties) vs float32

`{run['command']}` on {run['date']}. {run['cpu']}, {run['cores']} cores, torch {run['torch']},
`torch.set_num_threads({THREADS})`; 1-minute load average {run['load_start']:.2f} at the start and
{run['load_end']:.2f} at the end. {run['queries']} queries of dimension {run['dim']} against the whole
catalog (`ItemTables`, chunks of 262,144 rows), top-{run['k']}; median of {run['repeats']} calls, the
two forms alternating. topk: float32 is the plain path (every model but HRNN-meta with item
features), float64 the path through a row view (here the identity, so only the arithmetic
differs). target_ranks: float64 is `target_ranks` itself, for every model, which compares in
float64 with a slack so that rows bit-identical to the target's count against it; float32 is a bare
float32 count of the items at or above the target (`float32_ranks` in the script), which a
matmul's rounding lets miss such twins.

{markdown_table(["items", "call", "float32 s", "float64 s", "float64 / float32"], rows)}

Cold items left out (`table.WithoutItems`, the view a plain model ranks through when the data
has cold items; {COLD_SHARE:.0%} of the items flagged at random, in the same alternation): the
rows stay as stored, so top-k keeps the float32 path and adds a mask per chunk.

{markdown_table(["items", "topk s", "topk without cold items s", "ratio"], cold_rows)}
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
