"""Entrypoint for `ray job submit`: the same code as `vits-ray evaluate`.

    ray job submit --working-dir . -- python jobs/evaluate.py s3://bucket/runs/bn-ft \
        --data s3://bucket/bn/shards --out s3://bucket/runs/bn-ft/eval

Speaks the held-out split with the run's export and scores it against the recordings (eval.json
lands beside the run, where `vits-ray report` finds it); or compares two folders of WAVs.
"""

from vits_ray.cli import main

if __name__ == "__main__":
    main(["evaluate", *__import__("sys").argv[1:]], prog_name="jobs/evaluate.py")
