"""Shared fixtures."""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Everything a run writes to the temp folder (pytest's tmp_path folders, Ray's session logs,
# workers' checkpoint staging and TensorBoard folders, what a killed worker leaves behind) goes
# under one folder of this session's, removed when the session passes. The suite writes about
# 12 GB of checkpoints in all; CI machines have had less than 1 GB free, so nothing may pile up.
_SCRATCH = None
_PASSED = pytest.StashKey[bool]()


def pytest_configure(config):
    global _SCRATCH
    _SCRATCH = tempfile.mkdtemp(prefix="vits-ray-tests-")
    os.environ["TMPDIR"] = _SCRATCH  # Ray's and every worker's temp folder on Linux
    tempfile.tempdir = None  # gettempdir() caches; read TMPDIR again
    # At exit, not at unconfigure: handlers run last-registered first, so this one runs after
    # those of modules (multiprocessing's) that remove their own folders in it.
    atexit.register(_remove_scratch, config)


def pytest_sessionfinish(session, exitstatus):
    session.config.stash[_PASSED] = exitstatus == 0


def _remove_scratch(config):
    if config.stash.get(_PASSED, False):
        shutil.rmtree(_SCRATCH, ignore_errors=True)
    else:  # a failed test's tmp_path (pytest keeps only those) and Ray's logs, for reading
        print(f"\ntest scratch kept for inspection: {_SCRATCH}")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def demo_corpus_dir(tmp_path_factory) -> Path:
    """A 24-utterance espeak-ng demo corpus (LJSpeech layout), written once per session."""
    from vits_ray.demo.corpus import write_demo_corpus

    return write_demo_corpus(tmp_path_factory.mktemp("demo_corpus"), n=24, seed=0)


# The real S3-protocol server on 127.0.0.1 (moto) and a fresh bucket per test.
from s3_fixtures import s3_server, s3_uri  # noqa: E402,F401


@pytest.fixture(scope="session")
def prepared_demo(demo_corpus_dir, tmp_path_factory) -> Path:
    """The demo corpus through `prepare` with the tiny recipe: local shards, several train shards."""
    from vits_ray.config import load_config
    from vits_ray.data.ingest import prepare_corpus

    out = tmp_path_factory.mktemp("shards")
    cfg = load_config("tiny", ["data.rows_per_shard=8"])
    summary = prepare_corpus(demo_corpus_dir, "ljspeech", str(out), cfg, progress=False)
    assert summary.accepted >= 20
    return out


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """A real local Ray cluster bound to loopback, shared by the session's training tests.

    Started after the S3 server so its workers inherit the endpoint and test credentials, as
    workers of a real cluster get theirs from their environment.
    """
    import ray

    # See the Makefile: Ray's metrics thread has crashed actors here; nothing reads the metrics.
    os.environ.setdefault("RAY_enable_metrics_collection", "0")
    # Ray 2.60 turns token authentication on for a new local cluster and writes the token itself.
    # The dashboard serves the State API, which Ray Train's PlacementGroupCleaner needs to free the
    # placement group of a trial that Tune stopped early (see train.ensure_ray).
    ray.init(num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1", _node_ip_address="127.0.0.1",
             configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def trained_run(prepared_demo, tmp_path_factory) -> Path:
    """A tiny model trained 4 steps in this process (`--local`), measuring its quality every 2 steps:
    a run folder with records, quality records, best/ and export/, for the synthesis, export,
    evaluation and report tests."""
    from vits_ray.config import load_config
    from vits_ray.train import TrainJob, run_training

    cfg = load_config("tiny", ["train.batch_size=2", "train.save_step=2", "train.val_step=2",
                               "eval.every_steps=2", "eval.utterances=2"])
    storage = tmp_path_factory.mktemp("trained")
    run_training(TrainJob(config=cfg.to_dict(), data_uri=str(prepared_demo), storage_uri=str(storage), name="voice",
                          max_steps=4), local=True)
    return storage / "voice"
