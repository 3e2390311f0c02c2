"""Session fixtures of the server tests: one Prefect server, pool, deployments and worker, and one
tiny experiment config, shared by every test that needs them (tests/flows/prefect_server.py)."""

from __future__ import annotations

import pytest
import yaml

from tests.corpora import write_corpus
from tests.flows.prefect_server import server_and_worker
from tests.tiny_pipeline import tiny_pipeline_config


@pytest.fixture(scope="session")
def deployed(tmp_path_factory):
    """A server, the pool, every deployment of prefect.yaml, and a worker (a tests.flows.prefect_server.Deployed)."""
    yield from server_and_worker(tmp_path_factory.mktemp("server"))


def tiny_experiment(base) -> dict:
    """The tiny pipeline config of the server tests (two layers, one traced root)."""
    text = "Each feature of a transcoder fires on a pattern of text that a person can name and check. "
    corpus = base / "corpus"
    if not corpus.exists():
        write_corpus(corpus, 40, text, min_repeats=2)
    return tiny_pipeline_config(corpus, base / "store")


@pytest.fixture(scope="session")
def tiny_config(deployed):
    path = deployed.base / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_experiment(deployed.base)))
    return path
