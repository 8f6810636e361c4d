"""A tiny synthetic Bangla corpus so the pipeline can run end to end without real data."""

from vits_ray.demo.corpus import write_demo_corpus

__all__ = ["write_demo_corpus"]
