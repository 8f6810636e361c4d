"""Entrypoint for `ray job submit`: the same code as `vits-ray tune`.

    ray job submit --working-dir . -- python jobs/tune.py --config bn_bd_vits \
        --data s3://bucket/shards --storage s3://bucket/sweeps --name lr-sweep --trials 16 --concurrent 4 --gpu \
        --from-run s3://bucket/runs/bn-ft

It joins the cluster in RAY_ADDRESS (set by `ray job submit`), or starts a local one.
"""

import sys

from vits_ray.cli import tune

if __name__ == "__main__":
    tune(sys.argv[1:], prog_name="jobs/tune.py")  # the subcommand itself: usage reads "jobs/tune.py [OPTIONS]"
