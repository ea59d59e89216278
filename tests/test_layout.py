"""The package's structure and public API: no import cycle, no oversized module, heads without type switches, and
the registered names, constructor keywords and state-dict layouts pinned in ``api_pins.json``."""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import inspect
import json
from pathlib import Path

import pytest
import timm

import piip_models
from piip_models import PIIP, BranchCfg, InteractionCfg, PIIPLlava, create_pyramid

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"piip_models": ROOT / "src" / "piip_models", "piip_models.kernels": ROOT / "kernels"}
PINS = json.loads((Path(__file__).with_name("api_pins.json")).read_text())
MAX_MODULE_LINES = 600


def package_modules() -> dict[str, Path]:
    """Dotted module name -> source file, for every module of the package (the kernels folder included)."""
    modules = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            if package == "piip_models" and path.is_relative_to(PACKAGES["piip_models.kernels"]):
                continue
            parts = path.relative_to(folder).with_suffix("").parts
            name = ".".join((package, *parts))
            modules[name.removesuffix(".__init__")] = path
    return modules


def import_edges(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Package modules that importing ``name`` executes: every explicit import (module level, in functions and under
    TYPE_CHECKING alike) and the packages between the two modules' common ancestor and the imported module."""
    is_package = path.name == "__init__.py"
    base = name if is_package else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            source = node.module or ""
            if node.level:
                anchor = base.split(".")[: len(base.split(".")) - node.level + 1]
                source = ".".join(anchor + ([source] if source else []))
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                targets.add(submodule if submodule in modules else source)
    edges = set()
    for target in targets:
        if target not in modules:
            continue
        common = 0
        while common < min(len(name.split(".")), len(target.split("."))) and \
                name.split(".")[common] == target.split(".")[common]:
            common += 1
        parts = target.split(".")
        edges.update(".".join(parts[:i]) for i in range(common + 1, len(parts) + 1))
    return edges - {name}


def test_import_graph_has_no_cycle():
    modules = package_modules()
    graph = {name: import_edges(name, path, modules) for name, path in modules.items()}
    assert "piip_models.piip" in graph and "piip_models.kernels.op" in graph
    visiting, done, cycles = [], set(), []

    def visit(node: str) -> None:
        if node in done:
            return
        if node in visiting:
            cycles.append(visiting[visiting.index(node):] + [node])
            return
        visiting.append(node)
        for child in sorted(graph[node]):
            visit(child)
        visiting.pop()
        done.add(node)

    for name in sorted(graph):
        visit(name)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_kernels_never_import_the_rest_of_the_package():
    modules = package_modules()
    for name, path in modules.items():
        if name.startswith("piip_models.kernels"):
            outside = {e for e in import_edges(name, path, modules) if not e.startswith("piip_models.kernels")}
            assert outside <= {"piip_models"}, f"{name} imports {sorted(outside)}"


def test_import_graph_detects_a_cycle(tmp_path):
    """The walker above sees function-level and relative imports (so a passing cycle test means something)."""
    (tmp_path / "a.py").write_text("def f():\n    from . import b\n")
    (tmp_path / "b.py").write_text("from .a import f\n")
    modules = {"pkg.a": tmp_path / "a.py", "pkg.b": tmp_path / "b.py"}
    assert import_edges("pkg.a", modules["pkg.a"], modules) == {"pkg.b"}
    assert import_edges("pkg.b", modules["pkg.b"], modules) == {"pkg.a"}


def test_no_module_is_oversized():
    sizes = {name: len(path.read_text().splitlines()) for name, path in package_modules().items()}
    assert {name: n for name, n in sizes.items() if n > MAX_MODULE_LINES} == {}


def test_piip_switches_on_head_type_only_at_construction():
    """Heads are modules: forward_head, reset_classifier, get_classifier and the rest never branch on the string."""
    tree = ast.parse(inspect.getsource(PIIP))
    construction = {"__init__", "_build_merges", "_check_widths"}
    methods = [node for node in tree.body[0].body if isinstance(node, ast.FunctionDef)]
    assert {m.name for m in methods} >= construction | {"forward_head", "reset_classifier", "get_classifier"}
    readers = sorted(
        method.name for method in methods if method.name not in construction
        for node in ast.walk(method) if isinstance(node, ast.Attribute) and node.attr == "head_type"
    )
    assert readers == []


def test_registered_names_and_tags_are_pinned():
    names = sorted(timm.list_models("piip_*", include_tags=True)) + sorted(
        timm.list_models(["internvit_*", "windowed_*"], include_tags=True)
    )
    assert names == PINS["names"]


def test_constructor_keywords_are_kept():
    signatures = {
        "PIIP": list(inspect.signature(PIIP.__init__).parameters)[1:],
        "PIIPLlava": list(inspect.signature(PIIPLlava.__init__).parameters)[1:],
        "create_pyramid": list(inspect.signature(create_pyramid).parameters),
        "BranchCfg": [f.name for f in dataclasses.fields(BranchCfg)],
        "InteractionCfg": [f.name for f in dataclasses.fields(InteractionCfg)],
    }
    for owner, pinned in PINS["signatures"].items():
        missing = [name for name in pinned if name not in signatures[owner]]
        assert not missing, f"{owner} lost keyword(s) {missing}"


def state_dict_digest(model) -> str:
    text = "\n".join(f"{k} {tuple(v.shape)}" for k, v in sorted(model.state_dict().items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@pytest.mark.parametrize("name", sorted(piip_models.list_models()))
def test_state_dict_layout_is_pinned(name):
    """Every model's state-dict keys and shapes on meta, plain and ``features_only`` (dense models add their
    pyramid), equal the pinned digests, so released and converted checkpoints keep loading."""
    assert state_dict_digest(timm.create_model(name, device="meta")) == PINS["state_dict_sha256"][name]
    features = timm.create_model(name, device="meta", features_only=True)
    assert state_dict_digest(features) == PINS["state_dict_sha256"][f"{name}.features_only"]
