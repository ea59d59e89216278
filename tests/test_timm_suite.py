"""timm's own ``tests/test_models.py`` (timm 1.0.31 sdist) run against the ``piip_*`` models.

The sdist is fetched once into ``.timm/`` (``pip download``); the tests skip when it cannot be fetched.
CI runs a representative subset; the full sweep over every model is ``pytest -m slow tests/test_timm_suite.py``.

Exclusions (each with its reason):
- ``torchscript`` / ``fx`` tests: PIIP's forward is shape-dynamic end to end (branch images, token grids, position
  embeddings and deformable-attention geometry all derive from the input size), which neither TorchScript nor
  symbolic FX tracing can follow; ``torch.compile`` is the supported graph-capture path (tests/test_compile.py).
- ``pretrained`` tests: they download the released checkpoints from the Hub, which CI cannot reach;
  tests/test_hub.py loads every released layout through ``pretrained=True`` from a seeded offline cache instead.
- the InternViT-6B pyramids (``*6b*``): about 30 GB of fp32 weights, beyond a CPU test machine; they are covered on
  the meta device by tests/test_internvit.py.
- ``piip_llava_*``: a projector to a language model's width replaces the classifier (no ``num_classes``), and the
  2-interaction towers have fewer than the 3 feature taps timm's intermediates tests require
  (tests/test_llava.py covers them).
- ``test_model_backward`` of the regular-pyramid backbones (``piip_ct_*``, ``piip_vt_*``,
  ``piip_baseline_convnext_*``): their per-stage merges feed only the pyramid taps (``forward_intermediates``,
  ``features_only``), not the plain encoder ``forward`` that test differentiates (tests/test_convnext.py checks every
  parameter gets a gradient through the pyramid).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import timm

import piip_models  # noqa: F401  (registers the models listed below)

from .conftest import cpu_sized

TIMM_VERSION = timm.__version__
ROOT = Path(__file__).resolve().parents[1]
SUITE_DIR = ROOT / ".timm" / f"timm-{TIMM_VERSION}"
EXCLUDE_KEYWORDS = (
    "not torchscript and not fx and not pretrained and not piip_llava"
    " and not (test_model_backward and (piip_ct_ or piip_vt_ or piip_baseline_convnext))"
)
# CI subset: a classifier, a dense (detection) pyramid and the single-branch dense baseline. The intermediates
# contracts deep-copy the model once per tap, so CI runs them on the two models with the fewest taps x parameters.
SUBSET = ["piip_tsb", "piip_tsb_1120_896_448", "piip_baseline_vit_b_1024"]
INTERMEDIATES_SUBSET = ["piip_tsb", "piip_baseline_vit_b_1024"]


def timm_tests_dir() -> Path:
    test_file = SUITE_DIR / "tests" / "test_models.py"
    if not test_file.exists():
        download = ROOT / ".timm" / "sdist"
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q",
               f"timm=={TIMM_VERSION}", "-d", str(download)]
        if subprocess.run(cmd, capture_output=True, timeout=300).returncode != 0:
            pytest.skip(f"could not fetch the timm {TIMM_VERSION} sdist")
        with tarfile.open(download / f"timm-{TIMM_VERSION}.tar.gz") as archive:
            members = [m for m in archive.getmembers()
                       if m.name.startswith((f"timm-{TIMM_VERSION}/tests/", f"timm-{TIMM_VERSION}/pyproject.toml"))]
            archive.extractall(SUITE_DIR.parent, members=members, filter="data")
    return SUITE_DIR


def run_timm_suite(model_filter: str) -> None:
    suite = timm_tests_dir()
    env = dict(os.environ, TORCH_BACKEND="piip_models", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "pytest", "tests/test_models.py", "-p", "no:cacheprovider", "-q",
           "-k", f"({model_filter}) and {EXCLUDE_KEYWORDS}"]
    result = subprocess.run(cmd, cwd=suite, env=env, capture_output=True, text=True, timeout=3600)
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert " passed" in summary and "failed" not in summary, summary


def test_timm_suite_subset():
    # "]" ends a test id, so piip_tsb does not also select piip_tsb_1120_896_448; cfg tests carry every tag
    run_timm_suite(" or ".join(f"{name}] or {name}." for name in SUBSET))


@pytest.mark.slow
def test_timm_suite_every_model():
    run_timm_suite("piip_ and not 6b")


def _timm_test_module():
    spec = importlib.util.spec_from_file_location("_timm_test_models", timm_tests_dir() / "tests" / "test_models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def _tm():
    return _timm_test_module()


@pytest.mark.parametrize("name", INTERMEDIATES_SUBSET)
def test_forward_intermediates(_tm, name):
    _tm.test_model_forward_intermediates(name, 1)


@pytest.mark.parametrize("name", INTERMEDIATES_SUBSET)
def test_forward_intermediates_features(_tm, name):
    _tm.test_model_forward_intermediates_features(name, 1)


@pytest.mark.parametrize("name", INTERMEDIATES_SUBSET)
def test_prune_intermediate_layers_contract(_tm, name):
    _tm.test_prune_intermediate_layers_contract(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", cpu_sized(timm.list_models("piip_*", exclude_filters=["piip_llava_*"])))
def test_intermediates_every_model(_tm, name):
    _tm.test_model_forward_intermediates(name, 1)
    _tm.test_model_forward_intermediates_features(name, 1)
    _tm.test_prune_intermediate_layers_contract(name)
