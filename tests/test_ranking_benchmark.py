"""benchmarks/ranking.py --quick: both calls, both precisions, and its docs section rendered."""
import functools
import json
import sys

import torch

from dist_rec.embeddings.table import ItemTables
from tests.benchmark_scripts import load_script

ranking = load_script("ranking")


def test_quick_run_renders_its_section(tmp_path, monkeypatch, capsys):
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n")
    common = sys.modules["common"]
    monkeypatch.setattr(ranking, "replace_section", functools.partial(common.replace_section, path=docs))
    ranking.main(["--quick", "--write-docs"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    figures = [line for line in lines if line["figure"] == "ranking"]
    assert [f["items"] for f in figures] == [2000]
    assert all(f[key] > 0 for f in figures for key in f if key.endswith("_s"))
    text = docs.read_text()
    assert "<!-- ranking:start -->" in text and "| 2,000 | topk |" in text
    assert "| 2,000 | target_ranks |" in text
    assert "topk_cold_s" in figures[0] and "| items | topk s | topk without cold items s |" in text


def test_float32_baseline_ranks_as_target_ranks_without_twins():
    """The benchmark compares like with like: on distinct random rows the bare float32 count
    gives target_ranks' answer, chunked or not."""
    torch.manual_seed(0)
    tables = ItemTables(3000, 16, 16)
    hidden, targets = torch.randn(64, 16), torch.randint(1, 3001, (64,))
    expected = tables.target_ranks(hidden, targets)
    assert torch.equal(ranking.float32_ranks(tables, hidden, targets), expected)
    assert torch.equal(ranking.float32_ranks(tables, hidden, targets, chunk_rows=700), expected)
