"""Train HRNN on Taobao UserBehavior (or generated Taobao-like data) on a Ray cluster.

    python jobs/taobao_hrnn.py                      # embedded local Ray, generated data, 2 CPU workers
    python jobs/taobao_hrnn.py --smoke-test         # the same path, tiny (< 1 minute)
    ray job submit --working-dir . -- python jobs/taobao_hrnn.py \
        --events s3://bucket/UserBehavior.csv --work-dir s3://bucket/work \
        --storage s3://bucket/runs --workers 4 --gpu   # see cluster/aws-gpu.yaml

`python jobs/taobao_hrnn.py --help` lists every option.
"""
import sys
from pathlib import Path

# This checkout's dist_rec (as `ray job submit --working-dir .` ships it), not another install.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dist_rec.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]], train_prog="python jobs/taobao_hrnn.py"))
