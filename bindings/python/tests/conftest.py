"""Shared fixtures: the real test model (SmolLM2-135M-Instruct GGUF) and the C header."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from helpers import REPO


def _model_path() -> str:
    path = os.environ.get("CONVOY_MODEL")
    if not path:
        out = subprocess.run(
            [str(REPO / "scripts" / "setup.sh"), "--model-path"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        )
        path = out.stdout.strip()
    # Fails loudly (never skips): the model is part of the test setup (make test fetches it).
    assert Path(path).is_file(), f"test model missing at {path}: run scripts/setup.sh (make test does)"
    return path


@pytest.fixture(scope="session")
def model_path() -> str:
    return _model_path()


@pytest.fixture(scope="session")
def header() -> Path:
    path = Path(os.environ.get("CONVOY_INCLUDE_DIR", REPO / "include")) / "convoy.h"
    assert path.is_file(), f"{path} missing (set CONVOY_INCLUDE_DIR)"
    return path
