"""Entrypoint for `ray job submit`: the same code as `vits-ray evaluate`.

    ray job submit --working-dir . -- python jobs/evaluate.py s3://bucket/runs/bn-ft \
        --data s3://bucket/bn/shards --out s3://bucket/runs/bn-ft/eval

Speaks the held-out split with the run's export and scores it against the recordings (eval.json
lands beside the run, where `vits-ray report` finds it); or compares two folders of WAVs.
"""

import sys

from vits_ray.cli import evaluate

if __name__ == "__main__":
    evaluate(sys.argv[1:], prog_name="jobs/evaluate.py")  # the subcommand itself: usage reads "jobs/evaluate.py [OPTIONS]"
