"""Entrypoint for `ray job submit`: the same code as `vits-ray export`.

    ray job submit --working-dir . -- python jobs/export.py s3://bucket/runs/bn-ft \
        --onnx s3://bucket/runs/bn-ft/export/model.onnx

Exports the generator to ONNX, checked against PyTorch before anything is written.
"""

import sys

from vits_ray.cli import export_cmd

if __name__ == "__main__":
    export_cmd(sys.argv[1:], prog_name="jobs/export.py")  # the subcommand itself: usage reads "jobs/export.py [OPTIONS]"
