"""Entrypoint for `ray job submit`: the same code as `vits-ray train`.

    ray job submit --working-dir . -- python jobs/train.py --config bn_bd_vits \
        --data s3://bucket/shards --storage s3://bucket/runs --name bn-ft --workers 4 --gpu

It joins the cluster in RAY_ADDRESS (set by `ray job submit`), or starts a local one.
"""

import sys

from vits_ray.cli import train

if __name__ == "__main__":
    train(sys.argv[1:], prog_name="jobs/train.py")  # the subcommand itself: usage reads "jobs/train.py [OPTIONS]"
