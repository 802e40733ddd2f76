"""Shared fixtures: a tiny random-weight SmolVLM checkpoint built from the vendored model card, and its package.

Both are built once per test session (a few seconds) in a temporary folder; nothing is downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Never reach for the Hugging Face hub from the test suite, whatever the machine's network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

FIXTURES = Path(__file__).parent / "fixtures"
SMOLVLM_CARD = FIXTURES / "smolvlm-256m-instruct"


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from edgevlm.export.random_model import TinyDims, build_random_idefics3

    return build_random_idefics3(SMOLVLM_CARD, tmp_path_factory.mktemp("tiny-smolvlm"), dims=TinyDims())


@pytest.fixture(scope="session")
def tiny_package(tiny_checkpoint, tmp_path_factory) -> Path:
    from edgevlm.export.convert import Progress, export_package

    out = tmp_path_factory.mktemp("packages") / "tiny-smolvlm"
    with open(os.devnull, "w") as quiet:
        package, report = export_package(str(tiny_checkpoint), out, progress=Progress(quiet))
    assert report.ok, "\n".join(report.lines())
    return package.path


@pytest.fixture(scope="session")
def hf_model(tiny_checkpoint):
    from edgevlm.export.families.idefics3 import load_model

    return load_model(str(tiny_checkpoint))


@pytest.fixture(scope="session")
def hf_processor(tiny_checkpoint):
    from edgevlm.export.families.idefics3 import load_processor

    return load_processor(str(tiny_checkpoint))
