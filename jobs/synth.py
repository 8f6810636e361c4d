"""Entrypoint for `ray job submit`: the same code as `vits-ray synth`.

    ray job submit --working-dir . -- python jobs/synth.py s3://bucket/runs/bn-ft \
        --file sentences.txt --out speech/

The WAVs are written where the job's driver runs (--out is a local folder there).
"""

import sys

from vits_ray.cli import synth

if __name__ == "__main__":
    synth(sys.argv[1:], prog_name="jobs/synth.py")  # the subcommand itself: usage reads "jobs/synth.py [OPTIONS]"
