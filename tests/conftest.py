"""Shared fixtures."""

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def demo_corpus_dir(tmp_path_factory) -> Path:
    """A 24-utterance espeak-ng demo corpus (LJSpeech layout), written once per session."""
    from vits_ray.demo.corpus import write_demo_corpus

    return write_demo_corpus(tmp_path_factory.mktemp("demo_corpus"), n=24, seed=0)
