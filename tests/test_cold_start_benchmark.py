"""benchmarks/cold_start.py --quick: the catalog path end to end on a tiny generated world, and
its docs section rendered."""
import json

from tests.benchmark_scripts import load_script

cold_start = load_script("cold_start")


def test_quick_run_credits_cold_items_to_hrnn_meta_alone(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cold_start, "ROOT", tmp_path / "root")      # where --write-docs writes
    (tmp_path / "root" / "docs").mkdir(parents=True)
    (tmp_path / "root" / "docs" / "results.md").write_text("# Results\n")
    cold_start.main(["--quick", "--write-docs"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    world = next(line for line in lines if line["figure"] == "world")
    assert world["cold_items"] > 0 and 0 < world["test_events_on_cold_items"] < 0.2
    scores = {line["model"]: line for line in lines if line["figure"] == "scores"}
    # Models that cannot score cold items rank exactly as if those events were unknown items;
    # HRNN-meta finds some of them from their category.
    for name in ("MostPop", "HRNN"):
        assert scores[name]["recall"] == scores[name]["recall_unknown"]
        assert scores[name]["cold_listed"] == 0
    meta = scores["HRNN-meta, warm items at lambda 0.5"]
    assert meta["recall"] > meta["recall_unknown"] and meta["cold_listed"] > 0
    assert len([name for name in scores if name.startswith("HRNN-meta")]) == 10
    text = (tmp_path / "root" / "docs" / "results.md").read_text()
    assert "<!-- cold_start:start -->" in text and "| HRNN-meta, warm items at lambda 0.5 |" in text
