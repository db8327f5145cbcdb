"""benchmarks/gpu.py on the CPU (--device cpu --quick): every part runs, every check passes, and the
docs rendered from the raw lines (--render, what a GPU machine's lines come back as) are the ones
the run wrote itself."""
import importlib.util
import json
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))          # the scripts import their siblings (common, ...)
spec = importlib.util.spec_from_file_location("gpu_benchmark", BENCHMARKS / "gpu.py")
gpu = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu)

SECTION = "# Benchmarks\n\n<!-- gpu:start -->\nold\n<!-- gpu:end -->\n\n## kept\n"


def test_quick_cpu_run_passes_its_checks_and_renders_from_its_lines(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu, "RESULTS", tmp_path / "gpu.jsonl")
    monkeypatch.setattr(gpu, "DOCS", tmp_path / "benchmarks.md")
    monkeypatch.setattr(gpu, "IMAGE", tmp_path / "gpu.png")
    gpu.DOCS.write_text(SECTION)
    assert gpu.main(["--device", "cpu", "--quick", "--sizes", "1k", "--write-docs"]) == 0
    records = [json.loads(line) for line in gpu.RESULTS.read_text().splitlines()]
    run = gpu.collect(records)
    assert len(run["checks"]) == len(gpu.CHECKS) and all(c["passed"] for c in run["checks"])
    assert sorted(run["train"]) == [("dense", 32, False, 1000), ("is", 32, False, 1000), ("is", 32, True, 1000)]
    assert sorted(run["lengths"]) == [(m, n) for m in ("convrec", "dynamicrec", "sasrec") for n in (8, 16)]
    assert sorted(run["gru4rec"]) == [(64, 8, False), (64, 8, True), (64, 16, False), (64, 16, True)]
    assert run["plan"]["sizes"] == [1000] and run["wall_min"] > 0 and gpu.IMAGE.stat().st_size > 0
    written = gpu.DOCS.read_text()
    assert "## kept" in written and "old" not in written and "**gloo** group" in written
    assert "| 1,000 |" in written and "| sasrec | 16 |" in written

    gpu.DOCS.write_text(SECTION)
    assert gpu.main(["--render", str(gpu.RESULTS)]) == 0
    assert gpu.DOCS.read_text() == written


def test_a_failed_check_fails_the_run(tmp_path, monkeypatch):
    lines = gpu.RESULTS.read_text().splitlines()           # the tracked H200 run
    failed = [json.loads(line) for line in lines]
    check = next(r for r in failed if r["figure"] == "check")
    check["passed"] = False
    path = tmp_path / "gpu.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in failed))
    monkeypatch.setattr(gpu, "DOCS", tmp_path / "benchmarks.md")
    monkeypatch.setattr(gpu, "IMAGE", tmp_path / "gpu.png")
    gpu.DOCS.write_text(SECTION)
    assert gpu.main(["--render", str(path)]) == 1
    assert "**failed**" in gpu.DOCS.read_text()
