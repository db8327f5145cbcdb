"""`dist-rec generate | prepare | train`: the command line over the library.

`train` is what jobs/taobao_hrnn.py runs. Every JobConfig field can be set: the common ones have
flags, any other with `--set section.field=value`, and `--config run.json` sets the fields it
holds (a whole config printed by `--print-config`, or a few) over the defaults or --smoke-test,
so two runs can be diffed as files.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import sys
import threading
from typing import Any, Iterator

from botocore.exceptions import NoCredentialsError

from dist_rec.checkpoint.lease import RunBusy
from dist_rec.config import JobConfig


def column_list(text: str) -> tuple[str, ...]:
    """'a,b' -> ('a', 'b')."""
    return tuple(name.strip() for name in text.split(",") if name.strip())


# flag -> (config path, type, help). One table, so --help and the config cannot drift apart.
TRAIN_FLAGS: dict[str, tuple[str, Any, str]] = {
    "--events": ("data.events_uri", str, "events to train on: UserBehavior.csv or a Parquet "
                 "directory, local or s3://; empty = generate Taobao-like data first"),
    "--work-dir": ("data.work_dir", str, "where generated events and prepared data (vocabulary, "
                   "window shards) go; default: a local directory; on a multi-node cluster use "
                   "shared storage (s3://bucket/prefix) that every worker can read"),
    "--model": ("model.name", str, "encoder (MostPop always runs beside it as the baseline)"),
    "--context-column": ("data.context_column", str, "Parquet events: column of the request "
                         "context (e.g. device), an input of hrnn_meta"),
    "--values": ("data.carry_values", bool, "Parquet events: carry the `value` column into "
                 "training (hrnn_meta's value_feedback / value_head options)"),
    "--user-features": ("data.user_feature_columns", column_list, "Parquet events: comma-"
                        "separated columns of user attributes (each user's newest value), "
                        "inputs of hrnn_meta"),
    "--item-features": ("data.item_feature_columns", column_list, "Parquet events: comma-"
                        "separated columns of item attributes beside category_id (each item's "
                        "newest value), inputs and eq. 2 feature rows of hrnn_meta"),
    "--item-catalog": ("data.item_catalog_uri", str, "Parquet of every item, local or s3://: "
                       "item_id and each item attribute column (category_id when the events "
                       "have it, then --item-features), all required. Items without a training "
                       "event (or with fewer than min_item_count) enter the vocabulary as cold "
                       "items: hrnn_meta ranks them from their attributes alone, other models "
                       "leave them out"),
    "--window-length": ("data.window_length", int, "T: (input, target) pairs per training window"),
    "--session-gap": ("data.session_gap_seconds", int, "seconds of inactivity that start a new "
                      "session (HRNN's session-start input)"),
    "--num-delta-buckets": ("data.num_delta_buckets", int, "log2 buckets of the gap to the next "
                            "event (HRNN's time-delta input; bucket 0 is padding)"),
    "--hidden": ("model.hidden_dim", int, "hidden size D (and output item vector size)"),
    "--embedding": ("model.embedding_dim", int, "input item vector size E"),
    "--loss": ("sampler.loss", str, "training loss"),
    "--negatives": ("sampler.num_negatives", int, "K shared negatives per batch (alias sampler)"),
    "--alpha": ("sampler.alpha", float, "negatives drawn from count^alpha (0 = uniform)"),
    "--workers": ("train.num_workers", int, "Ray Train workers (data-parallel ranks)"),
    "--gpu": ("train.use_gpu", bool, "one GPU per worker, NCCL"),
    "--bf16": ("train.bf16", bool, "bfloat16 autocast for the encoder"),
    "--epochs": ("train.epochs", int, "passes over the training windows"),
    "--batch-size": ("train.batch_size", int, "windows per step per worker"),
    "--max-steps": ("train.max_steps", int, "stop after this many steps in all (0 = no limit); "
                    "the epoch it cuts short counts as done"),
    "--lr": ("train.dense_lr", float, "Adam learning rate of the encoder"),
    "--sparse-lr": ("train.sparse_lr", float, "row-wise Adagrad learning rate of the item tables"),
    "--seed": ("train.seed", int, "seed of initialisation, negatives and shuffling"),
    "--sharding": ("train.sharding", str, "item tables: none (replicated on every worker) or "
                   "row (row-wise sharded over the workers)"),
    "--storage": ("storage.uri", str, "checkpoints and results: local path or s3://bucket/prefix"),
    "--s3-endpoint": ("storage.endpoint_url", str, "S3 endpoint (MinIO, moto, ...); empty = AWS"),
    "--keep-last": ("storage.keep_last", int, "checkpoints to keep"),
    "--run-name": ("run_name", str, "name of the run: its directory under --storage"),
    "--strict": ("data.strict", bool, "fail on the first bad input row instead of quarantining it"),
    "--test-users": ("data.test_users", int, "held-out users for the TDM evaluation"),
    "--users": ("generate.num_users", int, "generated data: number of users (ignored when "
                "--events names a file; --smoke-test: a tiny world)"),
    "--items": ("generate.num_items", int, "generated data: catalog size"),
    "--num-events": ("generate.num_events", int, "generated data: number of events "
                     "(`dist-rec generate` calls this count --events)"),
}


# The flags `prepare` reads: where the events are, how they become windows, which users are held
# out (the seed draws them), where the prepared data goes, and the run (--storage, --run-name),
# whose lease it holds meanwhile. The rest only matter to training.
PREPARE_FLAGS = ("--events", "--work-dir", "--context-column", "--values", "--user-features",
                 "--item-features", "--item-catalog", "--window-length", "--session-gap",
                 "--num-delta-buckets", "--strict", "--test-users", "--seed", "--run-name",
                 "--storage", "--s3-endpoint", "--users", "--items", "--num-events")

# Item tables' layouts, as models.base.build_model accepts them.
SHARDINGS = ("none", "row")


def flag_choices() -> dict[str, tuple[str, ...]]:
    """flag -> the values the code accepts, so a typo fails in argparse, not in the Ray workers."""
    from dist_rec.losses import LOSSES
    from dist_rec.models import registered_models

    return {"--model": tuple(registered_models()), "--loss": tuple(LOSSES),
            "--sharding": SHARDINGS}


# How S3 is reached; printed under train's and prepare's --help.
S3_HELP = """\
S3 (s3:// in --events, --work-dir, --storage): credentials are either given in the config,
  --set storage.key=KEY --set storage.secret=SECRET [--set storage.region=REGION]
(they travel to the Ray workers inside the config; --print-config prints them as ***, so give
them again when reusing a printed config), or, when storage.key is empty, found on each node by
s3fs (botocore's chain): AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, ~/.aws/credentials, or the
instance's IAM role (cluster/aws-gpu.yaml gives every node one). --s3-endpoint points at a
non-AWS S3 (MinIO, moto).
"""


def add_train_arguments(parser: argparse.ArgumentParser, flags: tuple[str, ...] = tuple(TRAIN_FLAGS)
                        ) -> None:
    """`flags` (of TRAIN_FLAGS) and the config options (--config, --set, ...)."""
    defaults = JobConfig().to_dict()
    choices = flag_choices()
    for flag in flags:
        path, kind, text = TRAIN_FLAGS[flag]
        default = _get(defaults, path)
        if kind is bool:   # --no-gpu too: a --config may have turned it on
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                help=f"{text} (default: {'on' if default else 'off'})")
        elif flag in choices:
            named = all(name in text for name in choices[flag])   # the help names them already
            listed = "" if named else f": {', '.join(choices[flag])}"
            parser.add_argument(flag, type=kind, default=None, choices=choices[flag],
                                metavar=flag[2:].upper(),
                                help=f"{text}{listed} (default: {default!r})")
        else:
            parser.add_argument(flag, type=kind, default=None,
                                help=f"{text} (default: {default!r})")
    parser.add_argument("--config", help="JSON config whose fields are set over the defaults (or "
                        "--smoke-test's) before the flags: a whole one from --print-config, or a few")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="set any config field, e.g. --set data.session_gap_seconds=3600 "
                        "(value parsed as JSON when it can be)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config as JSON (local paths as given, so it diffs "
                        "across machines) and exit")
    parser.add_argument("--smoke-test", action="store_true",
                        help="a tiny configuration of the same path (< 1 minute); "
                        "--smoke-test --print-config shows it")


def config_from_args(args: argparse.Namespace, base: JobConfig) -> JobConfig:
    """base <- --config file <- flags <- --set, later wins."""
    raw = base.to_dict()
    if args.config:
        try:
            with open(args.config) as f:
                loaded = json.load(f)
            JobConfig.from_dict(loaded)      # checked alone, so that an error names the file
        except (OSError, TypeError, ValueError) as error:   # JSONDecodeError is a ValueError
            raise SystemExit(f"--config {args.config}: {error}") from None
        for section, value in loaded.items():    # over base: a file may hold a few fields
            for name, field_value in (value.items() if isinstance(value, dict) else [("", value)]):
                _put(raw, f"{section}.{name}" if name else section, field_value)
    for flag, (path, _, _) in TRAIN_FLAGS.items():
        value = getattr(args, flag.lstrip("-").replace("-", "_"), None)   # prepare has fewer
        if value is not None:
            _put(raw, path, value)
    for assignment in args.set:
        path, _, text = assignment.partition("=")
        if not _:
            raise SystemExit(f"--set {assignment!r}: expected SECTION.FIELD=VALUE")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        if isinstance(_get_field(raw, path), str):   # a text field takes the text (a secret of digits)
            value = text
        _put(raw, path, value)
    # --config and --set bypass argparse's choices: check the same names here, before any data work.
    for flag, allowed in flag_choices().items():
        path = TRAIN_FLAGS[flag][0]
        value = _get(raw, path)
        if value not in allowed:
            raise SystemExit(f"{path} = {value!r} (from --config or --set): unknown; choose from "
                             f"{', '.join(allowed)}")
    try:
        return JobConfig.from_dict(raw)
    except (TypeError, ValueError) as error:      # a section's own check, e.g. keep_last >= 1
        raise SystemExit(f"config: {error}") from None


def _get(raw: dict[str, Any], path: str) -> Any:
    for part in path.split("."):
        raw = raw[part]
    return raw


def _get_field(raw: dict[str, Any], path: str) -> Any:
    """The field at `path`, or None where there is none (then _put names the error)."""
    try:
        return _get(raw, path)
    except (KeyError, TypeError):
        return None


def _put(raw: dict[str, Any], path: str, value: Any) -> None:
    *sections, name = path.split(".")
    for part in sections:
        if part not in raw or not isinstance(raw[part], dict):
            raise SystemExit(f"unknown config section in {path!r}")
        raw = raw[part]
    if name not in raw:
        raise SystemExit(f"unknown config field {path!r}")
    raw[name] = value


def build_parser(train_prog: str | None = None) -> argparse.ArgumentParser:
    """train_prog: what train's usage line calls the command (a job script passes its own)."""
    from dist_rec.data import synthetic
    from dist_rec.train import pipeline

    parser = argparse.ArgumentParser(prog="dist-rec", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    generate = commands.add_parser(
        "generate", help="write synthetic Taobao-like events",
        description="Write synthetic Taobao-like events. Here --events is the number of events "
        "(train's --num-events); in train and prepare --events is a file path. An s3:// --out "
        "is reached through the AWS environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or "
        "~/.aws, and AWS_ENDPOINT_URL for a non-AWS S3).")
    synthetic.add_arguments(generate)
    prepare = commands.add_parser(
        "prepare", help="events -> vocabulary + window shards (train's first step, alone)",
        description="train's data step alone: read --events (or generate Taobao-like data when "
        "it is empty),\nhold out --test-users, write the vocabulary and window shards to "
        "WORK_DIR/prepared-RUN_NAME-<hash of --storage>\nand print that path. Its flags are "
        "train's data flags;\n--config and --set take a whole train config, of which the data "
        "settings count.\n(train prepares the data again itself.)",
        epilog=S3_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_arguments(prepare, PREPARE_FLAGS)
    train = commands.add_parser(
        "train", help="prepare, train on Ray, evaluate (TDM p@200/r@200) against MostPop",
        description=pipeline.__doc__, epilog=S3_HELP, prog=train_prog,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_arguments(train)
    train.add_argument("--ray-address", help="Ray cluster to join (default: RAY_ADDRESS or an "
                       "embedded local Ray)")
    return parser


def main(argv: list[str] | None = None, train_prog: str | None = None) -> int:
    from dist_rec.data import synthetic
    from dist_rec.train import pipeline

    args = build_parser(train_prog).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "generate":
        synthetic.run_from_args(args)
        return 0
    if args.print_config:
        print(pipeline.given_config(args, config_from_args).to_json())
        return 0
    job = pipeline.JobSpec.from_args(args, config_from_args)
    try:
        with _sigterm_exits():
            if args.command == "prepare":
                print(pipeline.prepare_alone(job).uri)
                return 0
            summary = pipeline.run(job)
    except RunBusy as error:                # another job of the run: no traceback to read
        raise SystemExit(str(error)) from None
    except NoCredentialsError as error:     # raised deep in s3fs, naming no path
        raw = job.config.to_dict()
        s3 = [f"{flag} {_get(raw, path)}" for flag, (path, _, _) in TRAIN_FLAGS.items()
              if str(_get(raw, path)).startswith("s3://")]
        raise SystemExit(f"{', '.join(s3)}: no S3 credentials found ({error}).\n{S3_HELP}") from None
    print(pipeline.format_summary(summary))
    return 0


@contextlib.contextmanager
def _sigterm_exits() -> Iterator[None]:
    """SIGTERM (`ray job stop`, a scheduler's timeout, `kill`) ends the job through its cleanup,
    as Ctrl-C does: the run's lease is released, so the next job need not wait for it to go
    stale. Python's default would end the process on the spot. Exit status 143; ray.init puts
    in its own handler, which does the same with status 15, so a job stopped while connected to
    Ray exits with 15. This covers the time before Ray, and `prepare`, which runs no Ray."""
    if threading.current_thread() is not threading.main_thread():
        yield                 # signal handlers can only be set from the main thread
        return

    def exit_on_sigterm(signum, frame):
        sys.exit(128 + signum)
    previous = signal.signal(signal.SIGTERM, exit_on_sigterm)
    try:
        yield
    finally:
        if signal.getsignal(signal.SIGTERM) is exit_on_sigterm:   # not if Ray replaced it
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


if __name__ == "__main__":
    sys.exit(main())
