"""Entrypoint for `ray job submit`: the same code as `vits-ray synth`.

    ray job submit --working-dir . -- python jobs/synth.py s3://bucket/runs/bn-ft \
        --file sentences.txt --out speech/

The WAVs are written where the job's driver runs (--out is a local folder there).
"""

from vits_ray.cli import main

if __name__ == "__main__":
    main(["synth", *__import__("sys").argv[1:]], prog_name="jobs/synth.py")
