"""Entrypoint for `ray job submit`: the same code as `vits-ray export`.

    ray job submit --working-dir . -- python jobs/export.py s3://bucket/runs/bn-ft \
        --onnx s3://bucket/runs/bn-ft/export/model.onnx

Exports the generator to ONNX, checked against PyTorch before anything is written.
"""

from vits_ray.cli import main

if __name__ == "__main__":
    main(["export", *__import__("sys").argv[1:]], prog_name="jobs/export.py")
