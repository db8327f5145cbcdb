"""benchmarks/gpu.py on the CPU (--device cpu --quick): every part runs and passes its checks, the
docs are rendered from the raw lines (--render, how a GPU machine's lines come back), a check over
its bound fails the run, and incomplete or partial runs are refused with a clear message.

On the CPU the checks compare the CPU with itself, so this tests their plumbing; their bounds are
tested with planted values below, and their figures on a GPU are in docs/benchmarks.md."""
import json

import pytest

from tests.benchmark_scripts import load_script

gpu = load_script("gpu")

SECTION = "# Benchmarks\n\n<!-- gpu:start -->\nold\n<!-- gpu:end -->\n\n## kept\n"


@pytest.fixture
def files(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu, "RESULTS", tmp_path / "gpu.jsonl")
    monkeypatch.setattr(gpu, "DOCS", tmp_path / "benchmarks.md")
    monkeypatch.setattr(gpu, "IMAGE", tmp_path / "gpu.png")
    gpu.DOCS.write_text(SECTION)
    return tmp_path


@pytest.fixture(scope="module")
def quick_lines():
    """The JSON lines of one quick CPU run at 1,000 items."""
    return gpu.measure(gpu.parse_args(["--device", "cpu", "--quick", "--sizes", "1k"]))


def test_quick_cpu_run_covers_every_part_and_passes(quick_lines):
    run = gpu.collect(quick_lines)
    assert len(run["checks"]) == len(gpu.CHECKS) and all(c["passed"] for c in run["checks"])
    assert sorted(run["train"]) == [("dense", 32, False, 1000), ("is", 32, False, 1000), ("is", 32, True, 1000)]
    assert all(r["timed_steps"] >= 1 and r["events_per_s"] > 0 for r in run["train"].values())
    assert sorted(run["lengths"]) == [(m, n) for m in ("convrec", "dynamicrec", "sasrec") for n in (8, 16)]
    assert sorted(run["gru4rec"]) == [(64, 8, False), (64, 8, True), (64, 16, False), (64, 16, True)]
    assert run["plan"]["sizes"] == [1000] and run["wall_min"] > 0


def test_render_from_captured_lines_keeps_the_rest_of_the_page(files, quick_lines):
    captured = files / "stdout.txt"      # stdout as it comes back: JSON lines among other output
    captured.write_text("a warning\n" + "".join(json.dumps(r) + "\n" for r in quick_lines))
    assert gpu.main(["--render", str(captured)]) == 0
    text = gpu.DOCS.read_text()
    assert "## kept" in text and "\nold\n" not in text and "**gloo** group" in text
    assert "| 1,000 |" in text and "| sasrec | 16 |" in text and "| 64 / 8 |" in text
    assert gpu.IMAGE.stat().st_size > 0 and not gpu.RESULTS.exists()


def test_write_docs_keeps_the_raw_lines(files, quick_lines, monkeypatch):
    monkeypatch.setattr(gpu, "measure", lambda args: quick_lines)
    assert gpu.main(["--device", "cpu", "--write-docs"]) == 0
    assert [json.loads(line) for line in gpu.RESULTS.read_text().splitlines()] == json.loads(json.dumps(quick_lines))
    rendered = gpu.DOCS.read_text()
    gpu.DOCS.write_text(SECTION)
    assert gpu.main(["--render", str(gpu.RESULTS)]) == 0 and gpu.DOCS.read_text() == rendered


def test_a_check_over_its_bound_fails_the_run(files, quick_lines, monkeypatch):
    planted = [("planted", lambda device: {"drift": 0.2, "share": 0.5}, "drift", 0.05, "≤"),
               ("planted", None, "share", 0.99, "≥"),
               ("planted ok", lambda device: {"z": -3.0}, "z", 4.0, "≤")]
    monkeypatch.setattr(gpu, "CHECKS", planted)
    checks = gpu.run_checks("cpu")
    assert [c["passed"] for c in checks] == [False, False, True]
    lines = quick_lines + checks
    path = files / "failed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert gpu.main(["--render", str(path)]) == 1
    assert gpu.DOCS.read_text().count("**failed**") == 2


def test_partial_runs_are_refused_with_the_missing_parts(files, quick_lines, capsys):
    cut = files / "cut.jsonl"          # a run killed after its checks
    cut.write_text("".join(json.dumps(r) + "\n" for r in quick_lines if r["figure"] in ("machine", "check")))
    with pytest.raises(ValueError, match="lack matmul, catalog, gru4rec, lengths"):
        gpu.main(["--render", str(cut)])
    assert gpu.DOCS.read_text() == SECTION
    for argv in (["--parts", "checks", "--write-docs"], ["--sizes", "1k", "--write-docs"], ["--parts", "length"]):
        with pytest.raises(SystemExit):
            gpu.main(["--device", "cpu", *argv])
    assert "unknown ['length']" in capsys.readouterr().err
