"""The command line rejects unknown names up front (no Ray, no data): a typo in --model, --loss or
--sharding is an argparse error naming the valid choices, not a failure inside the Ray workers."""
from __future__ import annotations

import json

import numpy as np
import pytest

from dist_rec.cli import build_parser, config_from_args, main
from dist_rec.config import JobConfig, TrainConfig
from dist_rec.train.pipeline import JobSpec
from dist_rec.losses import LOSSES
from dist_rec.models import registered_models


@pytest.mark.parametrize("flag, typo, valid", [
    ("--model", "hrn", registered_models()),
    ("--loss", "softmax", list(LOSSES)),
    ("--sharding", "rows", ["none", "row"]),
])
def test_a_typo_is_an_argparse_error_naming_the_choices(flag, typo, valid, capsys):
    with pytest.raises(SystemExit) as exit:
        build_parser().parse_args(["train", flag, typo])
    assert exit.value.code == 2                                   # argparse's usage error
    error = capsys.readouterr().err
    assert f"argument {flag}: invalid choice: '{typo}'" in error
    for name in valid:
        assert repr(name) in error


def test_prepare_takes_the_data_flags_and_refuses_the_training_ones(capsys):
    """prepare's --help lists what prepare reads; a training flag there is a usage error, not a
    setting silently ignored."""
    args = build_parser().parse_args(["prepare", "--num-delta-buckets", "8", "--session-gap", "600",
                                      "--window-length", "16", "--seed", "3"])
    data = JobSpec.from_args(args, config_from_args).config.data
    assert (data.num_delta_buckets, data.session_gap_seconds, data.window_length) == (8, 600, 16)
    for flag, value in (("--model", "gru4rec"), ("--epochs", "2"), ("--ray-address", "auto")):
        with pytest.raises(SystemExit) as exit:
            build_parser().parse_args(["prepare", flag, value])
        assert exit.value.code == 2
        assert f"unrecognized arguments: {flag} {value}" in capsys.readouterr().err


def test_every_valid_name_is_accepted(capsys):
    for name in registered_models():
        assert main(["train", "--model", name, "--print-config"]) == 0
        assert json.loads(capsys.readouterr().out)["model"]["name"] == name
    for loss in LOSSES:
        assert main(["train", "--loss", loss, "--sharding", "row", "--print-config"]) == 0
        printed = json.loads(capsys.readouterr().out)
        assert printed["sampler"]["loss"] == loss and printed["train"]["sharding"] == "row"


def test_a_printed_config_keeps_paths_as_given_and_reads_back_to_itself(tmp_path, capsys,
                                                                         monkeypatch):
    """--print-config is for diffing and reuse: relative paths stay relative (the job itself makes
    them absolute for the Ray workers), and --config of the printed JSON prints the same JSON."""
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--events", "events/", "--storage", "s3://bucket/runs",
                 "--print-config"]) == 0
    printed = capsys.readouterr().out
    config = json.loads(printed)
    assert config["data"]["events_uri"] == "events/"
    assert config["data"]["work_dir"] == "runs/data"
    assert config["storage"]["uri"] == "s3://bucket/runs"
    (tmp_path / "run.json").write_text(printed)
    assert main(["train", "--config", "run.json", "--print-config"]) == 0
    assert capsys.readouterr().out == printed
    args = build_parser().parse_args(["train", "--config", "run.json"])
    ran = JobSpec.from_args(args, config_from_args).config
    assert ran.data.events_uri == str(tmp_path / "events")
    assert ran.data.work_dir == str(tmp_path / "runs" / "data")
    assert ran.storage.uri == "s3://bucket/runs"


def test_a_typo_through_set_or_config_fails_before_any_work(tmp_path):
    with pytest.raises(SystemExit, match="model.name = 'hrn'.*hrnn_meta"):
        main(["train", "--set", "model.name=hrn", "--print-config"])
    (tmp_path / "run.json").write_text(json.dumps({"sampler": {"loss": "softmax"}}))
    with pytest.raises(SystemExit, match="sampler.loss = 'softmax'.*sampled_softmax"):
        main(["train", "--config", str(tmp_path / "run.json"), "--print-config"])


def test_a_bad_value_fails_before_any_work():
    with pytest.raises(SystemExit, match="config: StorageConfig.keep_last must be >= 1, got 0"):
        main(["train", "--set", "storage.keep_last=0", "--print-config"])
    with pytest.raises(SystemExit, match="config: TrainConfig.log_every must be >= 1, got 0"):
        main(["train", "--set", "train.log_every=0", "--print-config"])
    with pytest.raises(SystemExit, match="config: TrainConfig.max_steps must be >= 0, got -1"):
        main(["train", "--max-steps", "-1", "--print-config"])


def test_a_bad_config_file_is_named(tmp_path):
    """A syntax error or an unknown field names the file, as a message, not a traceback."""
    broken = tmp_path / "broken.json"
    broken.write_text('{"train": {"epochs": 2,}}')
    with pytest.raises(SystemExit, match=f"--config {broken}: Expecting property name.*line 1 column 24"):
        main(["train", "--config", str(broken), "--print-config"])
    typo = tmp_path / "typo.json"
    typo.write_text('{"trian": {}}')
    with pytest.raises(SystemExit, match=f"--config {typo}: JobConfig: unknown field 'trian'"):
        main(["train", "--config", str(typo), "--print-config"])
    with pytest.raises(SystemExit, match=f"--config {tmp_path / 'missing.json'}: .*No such file"):
        main(["train", "--config", str(tmp_path / "missing.json"), "--print-config"])


def test_the_job_script_usage_names_the_script(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"], train_prog="python jobs/taobao_hrnn.py")
    assert capsys.readouterr().out.startswith("usage: python jobs/taobao_hrnn.py ")


def test_a_printed_config_reproduces_the_job(tmp_path, capsys):
    """--print-config holds everything the job reads: the generated world's sizes and the
    held-out users too, so --config alone gives the same job as the flags that printed it."""
    flags = ["train", "--smoke-test", "--users", "1500", "--test-users", "120"]
    assert main([*flags, "--print-config"]) == 0
    (tmp_path / "run.json").write_text(capsys.readouterr().out)

    def job(argv):
        return JobSpec.from_args(build_parser().parse_args(argv), config_from_args)

    expected, reloaded = job(flags), job(["train", "--config", str(tmp_path / "run.json")])
    assert reloaded == expected
    assert (reloaded.synthetic.num_users, reloaded.synthetic.num_items) == (1_500, 5_000)
    assert reloaded.config.data.test_users == 120


@pytest.mark.parametrize("fields, message", [
    ({"train": {"use_gpu": "false"}}, "TrainConfig.use_gpu: expected true or false, got 'false'"),
    ({"model": {"hidden_dim": "64"}}, "ModelConfig.hidden_dim: expected an integer, got '64'"),
    ({"data": {"num_delta_buckets": 16.5}}, "DataConfig.num_delta_buckets: expected an integer"),
    ({"data": {"event_types": "pv"}}, "DataConfig.event_types: expected a list of str, got 'pv'"),
    ({"storage": {"uri": 5}}, "StorageConfig.uri: expected a string, got 5"),
    ({"sampler": {"event_weights": {"pv": "x"}}},
     r"SamplerConfig.event_weights\['pv'\]: expected a number"),
    ({"train": 3}, "TrainConfig: expected an object of fields, got 3"),
])
def test_a_value_of_the_wrong_type_is_named_before_any_work(tmp_path, fields, message):
    """JSON has no field types: "false" is a true string, "64" no size. Each is refused naming
    the file and the field, where it would otherwise reach the Ray workers (or turn a GPU on)."""
    path = tmp_path / "run.json"
    path.write_text(json.dumps(fields))
    with pytest.raises(SystemExit, match=f"--config {path}: {message}"):
        main(["train", "--config", str(path), "--print-config"])
    section, values = next(iter(fields.items()))
    [(name, value)] = values.items() if isinstance(values, dict) else [(None, None)]
    if name and section != "storage":   # the same value through --set (a text field takes text)
        with pytest.raises(SystemExit, match=message):
            main(["train", "--set", f"{section}.{name}={json.dumps(value)}", "--print-config"])


def test_a_config_built_in_python_is_checked_and_gives_plain_json():
    """Code that builds a JobConfig (a sweep over np.arange) gets numpy's numbers as Python's,
    so the summary's JSON at the end of a job does not fail on them; a wrong kind is named when
    the config is built, by the constructor or by replace()."""
    config = JobConfig(train=TrainConfig(batch_size=np.int64(64), dense_lr=np.float32(0.5),
                                         use_gpu=np.bool_(True)))
    assert (type(config.train.batch_size), type(config.train.dense_lr),
            type(config.train.use_gpu)) == (int, float, bool)
    assert json.loads(config.to_json())["train"]["batch_size"] == 64
    options = JobConfig().replace(model={"options": {"kernel": np.int64(5), "sizes": [np.int32(2)]}})
    assert json.loads(options.to_json())["model"]["options"] == {"kernel": 5, "sizes": [2]}
    assert JobConfig().replace(storage={"endpoint_url": None}).storage.endpoint_url == ""
    with pytest.raises(TypeError, match="TrainConfig.use_gpu: expected true or false, got 'no'"):
        JobConfig(train=TrainConfig(use_gpu="no"))
    with pytest.raises(TypeError, match="ModelConfig.hidden_dim: expected an integer, got 6.5"):
        JobConfig().replace(model={"hidden_dim": 6.5})
    with pytest.raises(TypeError, match="JobConfig.train: expected a TrainConfig"):
        JobConfig(train={"epochs": 2})


def test_set_gives_a_text_field_its_text(capsys):
    """--set parses JSON where it can, but a text field takes the text: a secret of digits."""
    assert main(["train", "--set", "storage.secret=12345678", "--set", "storage.key=k",
                 "--set", "train.epochs=2", "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["storage"]["secret"] == "***" and printed["train"]["epochs"] == 2
    args = build_parser().parse_args(["train", "--set", "storage.secret=12345678"])
    assert config_from_args(args, JobConfig()).storage.secret == "12345678"


def test_a_config_file_sets_its_fields_over_the_smoke_test_and_flags_over_both(tmp_path, capsys):
    """base (--smoke-test) <- --config (a few fields) <- flags: the file does not bring back the
    full-size defaults it does not name, and --no-gpu turns off what the file turned on."""
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"train": {"use_gpu": True, "epochs": 3}, "run_name": "mine"}))
    assert main(["train", "--smoke-test", "--config", str(path), "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert (printed["run_name"], printed["train"]["epochs"], printed["train"]["use_gpu"]) == (
        "mine", 3, True)
    assert (printed["model"]["hidden_dim"], printed["generate"]["num_items"]) == (32, 5_000)
    assert main(["train", "--smoke-test", "--config", str(path), "--no-gpu", "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["train"]["use_gpu"] is False


def test_s3_without_credentials_names_the_uris_and_how_to_give_them(tmp_path, monkeypatch):
    """botocore's "Unable to locate credentials" names no path; the command names the s3://
    options and the ways to give credentials. (No S3 is reached: signing fails first.)"""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")      # no instance role to ask
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    with pytest.raises(SystemExit, match=r"(?s)--events s3://bucket/UserBehavior.csv: no S3 "
                                         r"credentials found \(Unable to locate credentials\)"
                                         r".*--set storage.key=KEY"):
        main(["prepare", "--events", "s3://bucket/UserBehavior.csv", "--s3-endpoint",
              "http://127.0.0.1:9", "--work-dir", str(tmp_path / "work")])
