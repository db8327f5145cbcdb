"""benchmarks/ranking.py --quick: both calls, both paths, and its docs section rendered."""
import functools
import importlib.util
import json
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))          # the scripts import their siblings (common, ...)
spec = importlib.util.spec_from_file_location("ranking_benchmark", BENCHMARKS / "ranking.py")
ranking = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ranking)


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
