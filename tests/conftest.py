"""Shared test helpers: the official fixtures folder and small model factories."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import piip_models  # noqa: F401  (registers the piip_* models before any test collects them)


def fixtures_dir() -> Path:
    """``../shared/fixtures`` beside the checkout, or ``$PIIP_FIXTURES``."""
    env = os.environ.get("PIIP_FIXTURES")
    return Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"


def require_fixture(name: str) -> Path:
    path = fixtures_dir() / name
    if not path.is_dir():
        pytest.skip(f"official fixture {name} not available at {path}")
    return path


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
