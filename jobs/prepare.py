"""Entrypoint for `ray job submit`: the same code as `vits-ray prepare`.

    ray job submit --working-dir . -- python jobs/prepare.py --input corpus/ --format ljspeech \
        --output s3://bucket/bn/shards --config bn_bd_vits

The corpus folder must be readable where the job's driver runs (it travels with --working-dir
when it is inside the repo, or lives on a shared disk); the shards go wherever --output says.
"""

import sys

from vits_ray.cli import prepare

if __name__ == "__main__":
    prepare(sys.argv[1:], prog_name="jobs/prepare.py")  # the subcommand itself: usage reads "jobs/prepare.py [OPTIONS]"
