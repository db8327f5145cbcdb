"""benchmarks/reproduce.py plumbing on tiny files: splits, training rows, batches, the protocols'
counts, MostPop's exact figures, and the docs rendering (mean ± sd, markers kept)."""
from pathlib import Path

import numpy as np
import pytest
import torch

from dist_rec.evaluation.histories import Histories
from dist_rec.evaluation.protocols import session_last_item, user_leave_one_out

from tests.benchmark_scripts import load_script

reproduce = load_script("reproduce")


def test_split_sessions_is_70_10_20_disjoint_and_seeded():
    sessions = [np.array([i, i + 1]) for i in range(1, 101)]
    train, valid, test = reproduce.split_sessions(sessions, seed=3)
    assert (len(train), len(valid), len(test)) == (70, 10, 20)
    firsts = sorted(int(s[0]) for s in train + valid + test)
    assert firsts == list(range(1, 101))
    again = reproduce.split_sessions(sessions, seed=3)
    assert [int(s[0]) for s in again[2]] == [int(s[0]) for s in test]
    other = reproduce.split_sessions(sessions, seed=4)
    assert [int(s[0]) for s in other[2]] != [int(s[0]) for s in test]


def test_training_windows_keep_every_position_and_the_last_items():
    windows = reproduce.training_windows([np.array([5, 6, 7]), np.array([8]), np.array([1, 2, 3, 4, 9])],
                                         steps=3, users=np.array([11, 12, 13]))
    # The one-item sequence has no target and is dropped; the long one keeps its last 4 items.
    assert windows.items.tolist() == [[0, 5, 6], [2, 3, 4]]
    assert windows.targets.tolist() == [[0, 6, 7], [3, 4, 9]]
    assert windows.users.tolist() == [11, 13]


class RecordingRanker:
    """A Ranker that scores every item 0 and keeps the time-gap buckets of the real steps it saw."""

    num_items = 9

    def __init__(self):
        self.deltas: set[int] = set()

    def _seen(self, batch):
        self.deltas.update(batch.deltas[batch.items > 0].tolist())

    def target_ranks(self, batch, targets, exclude=None):
        self._seen(batch)
        return torch.zeros(len(targets), dtype=torch.int64)

    def candidate_scores(self, batch, candidates):
        self._seen(batch)
        return torch.zeros(candidates.shape)


def test_training_windows_have_the_time_gaps_the_protocols_evaluate_with():
    """Both files lack times: HRNN must read the same gap bucket in training as at evaluation,
    or the bucket it is evaluated with is a row that training never updated."""
    sequences = [np.array([1, 2, 3, 4]), np.array([5, 6, 7]), np.array([8, 9, 1, 2, 3])]
    windows = reproduce.training_windows(sequences, steps=4, users=np.array([1, 2, 3]))
    trained = set(windows.deltas[windows.items > 0].tolist())
    ranker = RecordingRanker()
    session_last_item(ranker, sequences, progress=False)
    histories = Histories.from_items(sequences, users=np.array([1, 2, 3]))
    user_leave_one_out(ranker, histories, target="valid", num_negatives=2, progress=False)
    assert len(trained) == 1 and ranker.deltas == trained


def test_epoch_batches_cover_every_row_once_and_drop_only_padding_columns():
    lengths = [1, 2, 3, 4, 5, 6, 7, 8, 2, 3]
    sequences = [np.arange(1, n + 2) for n in lengths]          # n targets each
    windows = reproduce.training_windows(sequences, steps=8)
    seen = []
    for batch in reproduce.epoch_batches(windows, 3, np.random.default_rng(0)):
        real = (batch.items > 0).sum(1)
        assert batch.items.shape[1] == int(real.max())          # no all-padding column left
        seen += batch.mask.sum(1).tolist()
    assert sorted(seen) == sorted(lengths)
    assert sum(seen) == windows.num_events == 41


def _write_data(tmp_path: Path) -> dict:
    """Tiny data sets under the real files' names -> {dataset: path}."""
    files = {name: tmp_path / path.name for name, path in reproduce.FILES.items()}
    rng = np.random.default_rng(0)
    # Sessions: random items 2..30 and always item 1 last, so MostPop (item 1 is the most
    # frequent training item) ranks every test target first: HR = NDCG = MRR = 1 exactly.
    lines = []
    for _ in range(50):
        items = list(rng.integers(2, 31, rng.integers(3, 7))) + [1]
        lines.append(",".join(map(str, [0] * (10 - len(items)) + items)))
    files["yoochoose"].write_text("\n".join(lines) + "\n")
    pairs = []
    for user in range(1, 41):
        items = [1] + list(rng.integers(2, 150, rng.integers(3, 7))) + [1]
        pairs += [f"{user} {item}" for item in items]
    pairs.append("41 150")                                     # the catalog reaches 150
    files["amazon"].write_text("\n".join(pairs) + "\n")
    return files


def test_end_to_end_on_tiny_files(tmp_path, monkeypatch):
    monkeypatch.setattr(reproduce, "FILES", _write_data(tmp_path))
    results, docs = tmp_path / "results.jsonl", tmp_path / "results.md"
    docs.write_text("# Results\n\nintro kept\n\n<!-- results:begin -->\nold\n<!-- results:end -->\n"
                    "\n## Notes\nnotes kept\n")
    records = reproduce.main(["--models", "mostpop,gru4rec,user_gru", "--seeds", "1",
                              "--epochs", "1", "--results", str(results), "--write-docs",
                              "--docs", str(docs)])
    by = {(r["dataset"], r["model"]): r for r in records}
    assert sorted(by) == [("amazon", "gru4rec"), ("amazon", "mostpop"), ("amazon", "user_gru"),
                          ("yoochoose", "gru4rec"), ("yoochoose", "mostpop")]
    sessions = reproduce.load_sessions(reproduce.FILES["yoochoose"])
    _, _, test = reproduce.split_sessions(sessions, 0)
    pop = by["yoochoose", "mostpop"]
    assert pop["test"]["count"] == 10 == len(test)
    assert pop["test"]["hr@10"] == pop["test"]["ndcg@20"] == pop["test"]["mrr@10"] == 1.0
    assert pop["every_position"]["count"] == sum(len(s) - 1 for s in test)
    amazon = by["amazon", "mostpop"]["test"]
    assert amazon["count"] == 40                                # user 41 has 1 event
    assert amazon["sampled_hr@10"] == amazon["sampled_ndcg@10"] == amazon["full_ndcg@10"] == 1.0
    trained = by["yoochoose", "gru4rec"]
    assert trained["epochs"] == trained["best_epoch"] == len(trained["valid_curve"]) == 1
    assert trained["loss"] == "full_softmax" and trained["device"] == "cpu"
    # Item tables: Adagrad lr 0.05 on YooChoose, 0.2 on Amazon's rarer items; --sparse-lr overrides.
    assert (trained["recipe"]["sparse_lr"], by["amazon", "gru4rec"]["recipe"]["sparse_lr"]) == (0.05, 0.2)
    assert reproduce.recipe("amazon", "sasrec", reproduce.parse_args(["--sparse-lr", "0.1"]).sparse_lr
                            ).sparse_lr == 0.1
    # Negatives q ∝ count^alpha: 0.75 on YooChoose, 0.25 on Amazon; --alpha overrides; recorded.
    assert (trained["sampler"]["alpha"], by["amazon", "gru4rec"]["sampler"]["alpha"]) == (0.75, 0.25)
    assert reproduce._sampler(reproduce.parse_args(["--alpha", "0.5"]), "bce", "amazon").alpha == 0.5
    assert 0.0 <= trained["test"]["hr@20"] <= 1.0 and trained["events_per_second"] > 0
    assert len(results.read_text().splitlines()) == 5
    assert all(r["code"] for r in records)                      # the commit the code came from
    text = docs.read_text()
    assert "intro kept" in text and "notes kept" in text and "old" not in text
    assert "| mostpop | - | 1 | 1.0000 | 1.0000 | 1.0000 | 1.0000 | MostPop | 0.0326 / 0.0566 / 0.0150 / 0.0199 | — | — | (1) |" in text
    assert "    (1) python benchmarks/reproduce.py --models mostpop,gru4rec,user_gru" in text   # rows name their command


def test_tables_show_mean_and_sample_sd_over_seeds():
    base = {"dataset": "amazon", "model": "sasrec", "loss": "full_softmax", "epochs": 4,
            "best_epoch": 3, "stopped_by_budget": False, "train_seconds": 10.0, "command": "cmd", "machine": "m",
            "date": "2026-01-01T00:00:00"}
    figures = {"sampled_ndcg@10": 0.5, "full_hr@10": 0.1, "full_ndcg@10": 0.05, "full_hr@20": 0.2}
    records = [{**base, "seed": seed, "test": {**figures, "sampled_hr@10": hr}}
               for seed, hr in enumerate((0.5, 0.7))]
    text = reproduce.render_tables(records)
    # mean 0.6, sample sd = sqrt(((0.1)^2 + (0.1)^2) / 1) = 0.1414; the unseen-items figure and
    # the perplexity were not recorded: dashes
    assert ("| sasrec | full_softmax | 2 | 0.6000 ± 0.1414 | 0.5000 ± 0.0000 | 0.1000 ± 0.0000 | "
            "0.0500 ± 0.0000 | 0.2000 ± 0.0000 | — | — | SASRec | 0.7410 / 0.5360 | 4(3)/4(3) | 10 |"
            ) in text
    # A rerun of the same command replaces seed 1's record, unseen-items figure included.
    rerun = {**base, "seed": 1, "test": {**figures, "sampled_hr@10": 0.9, "full_unseen_hr@20": 0.3}}
    text = reproduce.render_tables(records[:1] + [rerun])
    assert "| sasrec | full_softmax | 2 | 0.7000 ± 0.2828 |" in text
    text = reproduce.render_tables(records + [{**rerun, "seed": 0}, rerun])
    assert "| 0.2000 ± 0.0000 | 0.3000 ± 0.0000 | — | SASRec |" in text
    # Seeds 2-3 of the same setting, run by another command, join the row; its seed 1 supersedes.
    more = [{**base, "seed": seed, "command": "cmd --first-seed 1 --seeds 3",
             "test": {**figures, "sampled_hr@10": hr}} for seed, hr in ((1, 0.6), (2, 0.8), (3, 0.9))]
    text = reproduce.render_tables([{**r, "command": f"{r['command']} --seeds 2"} for r in records]
                                   + more)
    # seeds 0..3: 0.5, 0.6, 0.8, 0.9; mean 0.7, sample sd sqrt(0.1 / 3) = 0.1826
    assert "| sasrec | full_softmax | 4 | 0.7000 ± 0.1826 |" in text
    assert "| 4(3)/4(3)/4(3)/4(3) | 10 | (1, 2) |" in text
    # Each machine is named with the commands that ran on it.
    other = {**base, "seed": 0, "command": "cmd2", "machine": "n", "test": records[0]["test"]}
    text = reproduce.render_tables(records + [other])
    assert "Machines: m (command 1); n (command 2)." in text


def test_unknown_model_is_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        reproduce.parse_args(["--models", "mostpop,nextitnet"])
    assert "nextitnet" in capsys.readouterr().err


def test_write_docs_touches_only_the_text_between_its_markers(tmp_path):
    record = {"dataset": "yoochoose", "seed": 0, "model": "mostpop", "loss": "-", "command": "cmd",
              "machine": "m", "date": "2026-01-01T00:00:00",
              "test": {"hr@10": 0.5, "hr@20": 0.6, "ndcg@10": 0.3, "ndcg@20": 0.4},
              "every_position": {"recall@20": 0.7, "mrr@20": 0.2}}
    docs = tmp_path / "results.md"
    frozen = "## Frozen\n\n| model | HR@20 |\n| --- | --- |\n| gru4rec | 0.5525 |\n"
    docs.write_text(f"# R\n\n{frozen}\n<!-- results:begin -->\nold\n<!-- results:end -->\n\nnotes\n")
    reproduce.write_docs([record], docs)
    text = docs.read_text()
    assert text.startswith(f"# R\n\n{frozen}\n<!-- results:begin -->\n### YooChoose")
    assert text.endswith("<!-- results:end -->\n\nnotes\n") and "old" not in text
    assert "| mostpop | - | 1 | 0.5000 | 0.6000 | 0.3000 | 0.4000 |" in text
    # A page without markers is never replaced by a skeleton: its text could not be rebuilt.
    docs.write_text(frozen)
    with pytest.raises(ValueError, match="markers"):
        reproduce.write_docs([record], docs)
    assert docs.read_text() == frozen
    new = tmp_path / "new.md"
    reproduce.write_docs([record], new)
    assert "<!-- results:begin -->" in new.read_text()


def test_raw_records_go_to_the_tracked_file_and_quick_ones_do_not():
    root = reproduce.ROOT
    assert reproduce.parse_args([]).results == root / "benchmarks" / "results" / "reproduce.jsonl"
    assert reproduce.parse_args(["--quick"]).results == root / "runs" / "reproduce" / "quick.jsonl"
    assert reproduce.parse_args(["--results", "x.jsonl"]).results == Path("x.jsonl")


def test_data_dir_reads_the_data_sets_from_another_folder(tmp_path):
    _write_data(tmp_path)
    records = reproduce.main(["--data-dir", str(tmp_path), "--dataset", "amazon", "--models", "mostpop",
                              "--seeds", "1", "--results", str(tmp_path / "results.jsonl")])
    assert records[0]["test"]["count"] == 40                    # the tiny file's users, not ../shared's


def test_time_steps_times_each_loss_on_the_same_batches(tmp_path, monkeypatch):
    monkeypatch.setattr(reproduce, "FILES", _write_data(tmp_path))
    results = tmp_path / "results.jsonl"
    records = reproduce.main(["--dataset", "yoochoose", "--models", "mostpop,gru4rec",
                              "--loss", "full_softmax,sampled_softmax", "--negatives", "8",
                              "--time-steps", "0.1", "--results", str(results)])
    assert [(r["model"], r["loss"]) for r in records] == [("gru4rec", "full_softmax"),
                                                          ("gru4rec", "sampled_softmax")]
    for r in records:
        assert r["events_per_second"] > 0 and r["seconds_per_epoch"] > 0 and r["code"]
        assert r["timed_seconds"] >= 0.1
    assert not results.exists()                                 # the runs' file is untouched
    timing = tmp_path / "results_step_timing.jsonl"
    assert len(timing.read_text().splitlines()) == 2
