"""Entrypoint for `ray job submit`: the same code as `vits-ray report`.

    ray job submit --working-dir . -- python jobs/report.py s3://bucket/runs/bn-ft --out report/

Reads a run (STORAGE/NAME, a metrics.jsonl or a Coqui trainer log) and writes the report.
"""

import sys

from vits_ray.cli import report

if __name__ == "__main__":
    report(sys.argv[1:], prog_name="jobs/report.py")  # the subcommand itself: usage reads "jobs/report.py [OPTIONS]"
