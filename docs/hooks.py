"""MkDocs hooks for the API reference.

* The wheel ships ``kernels/`` as ``piip_models.kernels`` (``[tool.setuptools] package-dir`` in pyproject.toml), a
  mapping that static analysis of ``src/`` cannot see. Before mkdocstrings starts, a folder of symlinks laid out as
  the installed package, from that very mapping, becomes the Python handler's search path; it is removed when the
  build ends.
* The docstrings name other objects with Sphinx roles (``:func:`read_checkpoint```), which Markdown would show
  verbatim; they are rendered as the code they wrap (``~a.b.c`` as ``c``, as Sphinx does).
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.plugins import event_priority

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the docs extra installs tomli
    import tomli as tomllib

_views: list[Path] = []
# a Sphinx role before rendered inline code: ":func:<code>name</code>"; "~" keeps the last component only
_SPHINX_ROLE = re.compile(r":(?:func|meth|class|mod|data|attr|exc|obj):<code>(~(?:[\w]+\.)*)?")


def package_view(root: Path, target: Path) -> Path:
    """Symlinks under ``target`` that lay out every package of ``root``'s ``package-dir`` mapping at its import path.

    Returns:
        ``target``, a search path holding the top-level packages.
    """
    mapping = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    for package, source in sorted(mapping.items()):  # parents before their children
        folder = target.joinpath(*package.split("."))
        folder.mkdir(parents=True, exist_ok=True)
        for entry in (root / source).iterdir():
            if entry.name != "__pycache__" and not (folder / entry.name).exists():
                (folder / entry.name).symlink_to(entry.resolve())
    return target


@event_priority(100)  # before mkdocstrings reads its handler configuration
def on_config(config: MkDocsConfig) -> MkDocsConfig:
    view = Path(tempfile.mkdtemp(prefix="piip-models-docs-"))
    _views.append(view)
    root = Path(config.config_file_path).resolve().parent
    handler = config.plugins["mkdocstrings"].config.handlers.setdefault("python", {})
    handler["paths"] = [str(package_view(root, view))]
    return config


def on_page_content(html: str, **kwargs) -> str:
    return _SPHINX_ROLE.sub("<code>", html)


def on_shutdown() -> None:
    while _views:
        shutil.rmtree(_views.pop(), ignore_errors=True)
