"""The documentation: generated tables equal the code, the site builds in strict mode, the README quickstart runs."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save

from .test_pretrained import run_offline, seed_hub

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


@pytest.fixture(scope="module")
def generator():
    """``docs/gen_tables.py`` as a module (loaded once: its models are built once per test run)."""
    spec = importlib.util.spec_from_file_location("gen_tables", ROOT / "docs" / "gen_tables.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module while the file executes
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


def fenced_blocks(markdown: str, language: str) -> list[str]:
    """The bodies of the ```language blocks of a Markdown text, in order."""
    return re.findall(rf"^```{language}\n(.*?)^```$", markdown, flags=re.DOTALL | re.MULTILINE)


# ----------------------------------------------------------------------------------------------------------------
# Generated tables


def test_generated_tables_match_the_code(generator):
    assert generator.check_data() == []
    stale = generator.stale_pages()
    assert not stale, "pages out of date; run `python docs/gen_tables.py`:\n" + "".join(stale.values())[:6000]


def test_every_registered_model_is_on_its_family_page(generator):
    for family in generator.FAMILIES:
        page = (ROOT / "docs" / family.page).read_text()
        for name in generator.members()[family.key]:
            assert f"| `{name}` |" in page, f"{name} missing from docs/{family.page}"
    assert sum(map(len, generator.members().values())) == len(timm.list_models("piip_*"))


def test_generator_rejects_pages_without_their_blocks_and_unknown_branches(generator):
    with pytest.raises(ValueError, match="no generated block for"):
        generator.render("no blocks here\n", {"models": lambda: "| x |"}, "page.md")
    with pytest.raises(ValueError, match="has no builder"):
        generator.render("<!-- BEGIN GENERATED: other -->\n<!-- END GENERATED: other -->\n", {}, "page.md")
    with pytest.raises(ValueError, match="no documentation label"):
        generator.branch_label("resnet50.a1_in1k")
    assert generator.branch_label("deit3_large_patch16_384.fb_in22k_ft_in1k") == "DeiT III-L"


# ----------------------------------------------------------------------------------------------------------------
# README


def test_readme_is_a_front_page_with_the_ci_commands():
    text = README.read_text()
    assert len(text.splitlines()) <= 250
    install_and_run, install_and_test = fenced_blocks(text, "bash")
    assert install_and_run.strip() == "pip install -e . && python benchmarks/flops.py"
    assert install_and_test.strip() == 'pip install -e ".[test]" && python -m pytest'
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert install_and_test.strip() in ci, ".ci/run must run the README's test command"


def _safetensors_of(model_name: str, fill: float, dtype: torch.dtype, **kwargs) -> bytes:
    """Checkpoint bytes with every tensor of ``model_name``'s state dict set to ``fill`` (shapes from a meta model)."""
    model = timm.create_model(model_name, device="meta", **kwargs)
    return save({k: torch.full(v.shape, fill, dtype=dtype) for k, v in model.state_dict().items()})


def test_readme_quickstart_runs_offline(tmp_path):
    """Every ```python block of the README, in order in one interpreter, against a Hub cache seeded with synthetic
    checkpoints of the files its `pretrained=True` calls fetch (no network)."""
    cache = tmp_path / "hub"
    tsb_file = timm.get_pretrained_cfg("piip_tsb").hf_hub_filename
    # the released .pth's safetensors sibling, which the loader prefers; zeros, which no initialisation produces
    seed_hub(cache, "OpenGVLab/PIIP", {
        tsb_file.removesuffix(".pth") + ".safetensors": _safetensors_of("piip_tsb", 0.0, torch.bfloat16),
    })
    for name in ("deit_small_patch16_224.fb_in1k", "deit_tiny_patch16_224.fb_in1k"):
        seed_hub(cache, f"timm/{name}", {"model.safetensors": _safetensors_of(name, 0.25, torch.float32)})

    code = "\n\n".join(fenced_blocks(README.read_text(), "python"))
    assert "pretrained=True" in code
    checks = """
        # the snippets ran on the seeded weights, not on a fresh initialisation
        assert all(p.eq(0).all() for p in model.branches[2].blocks[11].parameters())
        assert custom.branches[1].blocks[3].mlp.fc1.weight.eq(0.25).all()
        print("README quickstart ok")
    """
    # the child runs with this process's thread count (OMP_NUM_THREADS is not passed on to it)
    threads = f"import torch\ntorch.set_num_threads({torch.get_num_threads()})\n"
    out = run_offline(cache, threads + code + "\n" + re.sub(r"^        ", "", checks, flags=re.MULTILINE))
    assert "README quickstart ok" in out
    assert "torch.Size([2, 10])" in out and "['boxes', 'labels', 'masks', 'scores']" in out


# ----------------------------------------------------------------------------------------------------------------
# The site


def _missing_docs_tools() -> list[str]:
    needed = ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python")
    return [name for name in needed if importlib.util.find_spec(name.split(".")[0]) is None
            or importlib.util.find_spec(name) is None]


@pytest.mark.skipif(bool(_missing_docs_tools()), reason="mkdocs-material / mkdocstrings-python not installed")
def test_site_builds_strict(tmp_path):
    site = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
         "--site-dir", str(site)],
        cwd=ROOT, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"}, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-6000:]
    # the API reference rendered from the docstrings, the kernels included (shipped from kernels/)
    kernels = (site / "api" / "kernels" / "index.html").read_text()
    assert "multi_scale_deformable_attention" in kernels and "grid_sample" in kernels
    models = (site / "api" / "models" / "index.html").read_text()
    assert "create_pyramid" in models and "Branch configs, largest model" in models
    # the docstrings' Sphinx roles render as code, not verbatim (docs/hooks.py)
    assert "<code>read_checkpoint</code>" in (site / "api" / "checkpoints" / "index.html").read_text()
    api_pages = {page.parent.name: page.read_text() for page in site.glob("api/*/index.html")}
    assert not [name for name, html in api_pages.items() if re.search(r":(func|class|meth):<code>", html)]
    # generated tables and the changelog made it into the site
    assert "piip_h6b_1024_512" in (site / "models" / "internvit-6b" / "index.html").read_text()
    assert "0.1.0" in (site / "changelog" / "index.html").read_text()
