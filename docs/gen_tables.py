"""Writes the model tables of the documentation from the code, so that no table can drift from it.

    python docs/gen_tables.py            # rewrite every generated block in README.md and docs/
    python docs/gen_tables.py --check    # exit 1 with a diff when a committed page differs from the code

A generated block is everything between ``<!-- BEGIN GENERATED: NAME -->`` and ``<!-- END GENERATED: NAME -->`` in a
page; the prose around it is written by hand. The blocks are built from the timm registry (every registered
``piip_*`` model, its tags and their ``pretrained_cfg``), the models themselves (branches, sizes, windows,
interactions and ``#params``, counted on the meta device, so even the 6B-parameter pyramids cost no memory) and
:data:`piip_models.published.PUBLISHED` (the published ``#Param`` / ``#FLOPs``). Official accuracies are not in the
code; they live in :data:`OFFICIAL_RESULTS` and :data:`LLAVA_SCORES` below, and ``tests/test_docs.py`` checks that
every released tag has one and that no entry names a model that does not exist.
"""

from __future__ import annotations

import argparse
import difflib
import fnmatch
import posixpath
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import timm
import torch
import torch.nn as nn
from timm.models import get_arch_pretrained_cfgs
from torch.overrides import TorchFunctionMode

import piip_models
from piip_models import PIIPLlava
from piip_models.published import published_row

ROOT = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------------------------------------------------
# Official results (the official README's tables; not re-measured here)

# Registered model -> its official result, as the family page's last column shows it.
OFFICIAL_RESULTS: dict[str, str] = {
    # ImageNet-1k top-1
    "piip_tsb": "82.1",
    "piip_sbl": "85.9",
    "piip_sbl_320_160_96": "85.2",
    # COCO Mask R-CNN 1x, box / mask AP
    "piip_tsb_1120_896_448": "43.6 / 38.7",
    "piip_tsb_1568_896_448": "45.0 / 40.3",
    "piip_tsb_1568_1120_672": "46.5 / 41.3",
    "piip_sbl_1120_672_448": "46.5 / 40.8",
    "piip_sbl_1344_896_448": "48.3 / 42.7",
    "piip_sbl_1568_896_672": "49.3 / 43.7",
    "piip_sbl_1568_1120_672": "50.0 / 44.4",
    "piip_tsbl_1344_896_672_448": "47.1 / 41.9",
    "piip_tsbl_1568_1120_672_448": "48.2 / 42.9",
    "piip_tsbl_1792_1568_1120_448": "49.4 / 44.1",
    "piip_sbl_1568_1120_672_augreg": "48.3 / 42.6",
    "piip_sbl_1568_1120_672_augreg_speedup": "48.1 / 42.4",
    "piip_sbl_1568_1120_672_mae": "49.1 / 43.0",
    "piip_sbl_1568_1120_672_dinov2": "51.0 / 44.7",
    "piip_sbl_1568_1120_672_beitv2": "51.8 / 45.4",
    "piip_baseline_vit_b_1024": "43.7 / 39.7",
    "piip_baseline_vit_l_1024": "46.7 / 42.5",
    "piip_h6b_1024_512": "55.8 / 49.0",
    "piip_h6b_1024_512_speedup": "55.6 / 49.0",
    "piip_baseline_internvit_6b_1024": "53.8 / 48.1",
    "piip_ct_cs_cb_1024_672_448": "46.4 / 41.7",
    "piip_ct_vs_vb_1024_672_448": "47.1 / 42.4",
    "piip_ct_cs_vb_1024_672_448": "46.8 / 42.2",
    "piip_ct_vs_cb_1024_672_448": "46.7 / 42.0",
    "piip_vt_cs_vb_1024_672_448": "45.4 / 40.9",
    "piip_vt_cs_cb_1024_672_448": "45.2 / 40.7",
    "piip_vt_vs_cb_1024_672_448": "44.8 / 40.3",
    "piip_baseline_convnext_b_1024": "42.4 / 38.7",
    # COCO DINO, box AP
    "piip_sbl_1792_1120_672_dino": "57.8 box AP (DINO 3x)",
    "piip_h6b_1024_768_dino": "60.0 box AP (DINO 1x)",
    # ADE20K UperNet, mIoU
    "piip_h6b_512_192": "57.81 mIoU",
    "piip_h6b_512_256": "58.35 mIoU",
    "piip_h6b_512_384": "59.32 mIoU",
    "piip_h6b_512_512": "59.85 mIoU",
    "piip_baseline_internvit_6b_512": "58.42 mIoU",
}

LLAVA_BENCHMARKS = ("MMB-EN", "MMVet", "TextVQA", "SQA-I", "GQA", "VQAv2", "SEED-I", "POPE", "avg")

# Released PIIP-LLaVA tag -> (language model, training data, scores in LLAVA_BENCHMARKS order): the whole LLaVA model.
LLAVA_SCORES: dict[str, tuple[str, str, tuple[float, ...]]] = {
    "piip_llava_clip_bl_512_256.llava_v1_5_7b": (
        "Vicuna-7B", "1.2M", (63.8, 32.0, 57.9, 68.8, 62.8, 79.1, 67.3, 86.5, 64.8)),
    "piip_llava_convnext_b_clip_l_640_224.llava_v1_5_7b": (
        "Vicuna-7B", "1.2M", (64.5, 31.9, 59.0, 68.3, 62.1, 79.9, 67.5, 86.5, 65.0)),
    "piip_llava_clip_bl_512_448.llava_v1_5_7b": (
        "Vicuna-7B", "1.2M", (66.2, 30.5, 59.5, 68.0, 63.7, 80.3, 69.0, 87.3, 65.6)),
    "piip_llava_convnext_b_clip_l_1024_336.llava_v1_5_7b": (
        "Vicuna-7B", "1.2M", (67.5, 31.5, 63.1, 68.1, 62.7, 81.1, 69.0, 87.9, 66.4)),
    "piip_llava_convnext_l_clip_l_1024_336.llava_v1_5_7b": (
        "Vicuna-7B", "1.2M", (67.0, 31.4, 67.1, 68.3, 63.9, 81.5, 69.4, 88.2, 67.1)),
    "piip_llava_convnext_l_clip_l_1024_336.llava_plus_7b": (
        "Vicuna-7B", "2.7M", (74.5, 44.7, 73.0, 95.0, 62.9, 82.3, 72.1, 87.5, 74.0)),
    "piip_llava_clip_bl_512_448_13b.llava_v1_5_13b": (
        "Vicuna-13B", "1.2M", (67.6, 36.1, 61.6, 71.0, 64.5, 81.2, 69.5, 87.2, 67.3)),
    "piip_llava_convnext_b_clip_l_1024_336_13b.llava_v1_5_13b": (
        "Vicuna-13B", "1.2M", (68.5, 37.7, 64.2, 71.1, 64.2, 81.8, 69.3, 87.9, 68.0)),
    "piip_llava_convnext_l_clip_l_1024_336_13b.llava_v1_5_13b": (
        "Vicuna-13B", "1.2M", (66.5, 36.8, 69.2, 69.8, 65.2, 82.5, 70.5, 87.6, 68.5)),
}

# ----------------------------------------------------------------------------------------------------------------------
# Branch names

_SIZE_LETTERS = {"tiny": "T", "small": "S", "base": "B", "large": "L", "huge": "H"}
_SIZE = "(tiny|small|base|large|huge)"
# timm architecture -> readable branch label; {} takes the size letter. First match wins.
_BRANCH_LABELS: tuple[tuple[str, str], ...] = (
    (rf"deit_{_SIZE}_patch16_224$", "DeiT-{}"),
    (rf"deit3_{_SIZE}_patch16_(224|384)$", "DeiT III-{}"),
    (rf"vit_{_SIZE}_patch16_(224|384)\.augreg", "AugReg ViT-{}"),
    (rf"vit_{_SIZE}_patch1[46]_224\.mae$", "MAE ViT-{}"),
    (rf"vit_{_SIZE}_patch14_dinov2\.", "DINOv2 ViT-{}"),
    (rf"windowed_beitv2_{_SIZE}_patch16_224", "BEiT v2 ViT-{}"),
    (rf"vit_{_SIZE}_patch1[46]_clip_quickgelu_(224|336)\.openai$", "CLIP ViT-{}"),
    (rf"convnext_{_SIZE}(_mlp)?\.clip_", "CLIP ConvNeXt-{}"),
    (rf"convnext_{_SIZE}\.fb_in1k$", "ConvNeXt-{}"),
    (r"internvit_6b_patch14_224", "InternViT-6B"),
)


def branch_label(model_name: str) -> str:
    """A readable name for a branch's timm model (``deit3_base_patch16_224.fb_in22k_ft_in1k`` -> ``DeiT III-B``).

    Raises:
        ValueError: A branch model without a label here (add one to ``_BRANCH_LABELS``).
    """
    arch = model_name.split(".")[0]
    for pattern, label in _BRANCH_LABELS:
        match = re.match(pattern, model_name) or re.match(pattern, arch)
        if match:
            return label.format(_SIZE_LETTERS.get(match.group(1), "")) if match.groups() else label
    raise ValueError(f"no documentation label for branch model {model_name!r}: add one to _BRANCH_LABELS")


def _window(cfg, windows: tuple[int, ...]) -> str:
    """``w14``, ``w24 + 4 global``, or nothing for global attention."""
    if not cfg.window_size:
        return ""
    global_blocks = sum(1 for w in windows if not w)
    return f" w{cfg.window_size}" + (f" + {global_blocks} global" if global_blocks else "")


def describe_branches(model: nn.Module, windows: bool = False) -> str:
    """``DeiT-B@128, DeiT-S@192, DeiT-T@368``: branch 0 (the largest model, the smallest image) first."""
    parts = []
    for cfg, size, wins in zip(model.branch_cfgs, model.branch_sizes, model.windows):
        parts.append(f"{branch_label(cfg.model_name)}@{size}" + (_window(cfg, wins) if windows else ""))
    return ", ".join(parts)


# ----------------------------------------------------------------------------------------------------------------------
# Families


def is_classifier(name: str) -> bool:
    return timm.get_pretrained_cfg(name).num_classes > 0


# In-place tensor methods that weight initialisers consist of (torch.nn.init, timm's trunc_normal_).
_INIT_OPS = frozenset({"uniform_", "normal_", "erfinv_", "clamp_", "mul_", "add_", "sub_", "div_", "fill_", "zero_",
                       "copy_", "exponential_"})


class _SkipMetaInit(TorchFunctionMode):
    """Makes weight initialisation of meta tensors a no-op. A meta tensor holds no values, so initialising it only
    costs time (most of a build on the meta device); shapes, and hence every count, are unchanged."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        target = args[0] if args else None
        if getattr(func, "__name__", "") in _INIT_OPS and isinstance(target, torch.Tensor) and target.is_meta:
            return target
        return func(*args, **(kwargs or {}))


@cache
def build(name: str) -> nn.Module:
    """The model as its family table counts it, on the meta device: dense backbones with their feature pyramid
    (what ``features_only=True`` builds), classifiers and towers as ``timm.create_model`` builds them."""
    dense = not is_classifier(name) and not name.startswith("piip_llava_")
    with _SkipMetaInit():
        return timm.create_model(name, device="meta", **({"with_fpn": True} if dense else {}))


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _branch_names(name: str) -> list[str]:
    return [cfg.model_name for cfg in build(name).branch_cfgs]


def family_of(name: str) -> str:
    """The family (and page) of a registered model: its head, then its branches decide."""
    branches = _branch_names(name)
    if isinstance(build(name), PIIPLlava):
        return "llava"
    if any(b.startswith("internvit_") for b in branches):
        return "internvit"
    if any(b.startswith("convnext_") for b in branches):
        return "convnext"
    return "vit-classification" if is_classifier(name) else "vit-detection"


@dataclass(frozen=True)
class Family:
    key: str
    title: str
    page: str  # relative to docs/


FAMILIES: tuple[Family, ...] = (
    Family("vit-classification", "ViT classification pyramids (ImageNet-1k)", "models/vit-classification.md"),
    Family("vit-detection", "ViT detection and segmentation backbones (COCO)", "models/vit-detection.md"),
    Family("internvit", "InternViT-6B pyramids (COCO, ADE20K)", "models/internvit-6b.md"),
    Family("convnext", "ConvNeXt and ConvNeXt/ViT backbones (COCO)", "models/convnext.md"),
    Family("llava", "PIIP-LLaVA vision towers", "models/llava.md"),
)


@cache
def members() -> dict[str, list[str]]:
    """Family key -> its registered models, in name order with the single-branch baselines last."""
    groups: dict[str, list[str]] = {family.key: [] for family in FAMILIES}
    for name in sorted(piip_models.list_models(), key=lambda n: (n.startswith("piip_baseline_"), n)):
        groups[family_of(name)].append(name)
    return groups


def tags(name: str) -> list[str]:
    """Tags in registration order; the first is the default that ``pretrained=True`` loads."""
    return [full.partition(".")[2] for full in get_arch_pretrained_cfgs(name)]


def released(name: str) -> list[str]:
    """``model.tag`` names with a released file on the Hub."""
    return [f"{name}.{tag}" for tag in tags(name) if timm.get_pretrained_cfg(f"{name}.{tag}").hf_hub_id]


# ----------------------------------------------------------------------------------------------------------------------
# Cells and tables


def _int(n: int) -> str:
    return f"{n:,}"


def _tags_cell(name: str) -> str:
    names = tags(name)
    return ", ".join(f"`{tag}`" + (" (default)" if i == 0 and len(names) > 1 else "") for i, tag in enumerate(names))


def _published_cell(name: str) -> str:
    row = published_row(name)
    if row is None:
        return "-"
    gmacs = row.macs / 1e9
    flops = f"{gmacs:.1f}G" if gmacs < 100 else f"{gmacs:.0f}G"  # as published: 17.4G, 243G
    flops += " [(†)](../counting.md#documented-exceptions)" if row.exception else ""
    return f"{row.params / 1e6:.0f}M / {flops}" if row.params is not None else flops


def _result_cell(name: str) -> str:
    return OFFICIAL_RESULTS.get(name, "-")


def _interactions_cell(model: nn.Module) -> str:
    return str(len(model.interactions)) if len(model.branches) > 1 else "- (single branch)"


def markdown_table(header: Iterable[str], rows: Iterable[Iterable[str]], align: str = "") -> str:
    """A Markdown table; ``align`` holds one character per column (``l`` or ``r``; default left)."""
    header = list(header)
    align = align or "l" * len(header)
    rule = ["---:" if a == "r" else "---" for a in align]
    lines = [header, rule, *([str(c) for c in row] for row in rows)]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def _model_cell(name: str) -> str:
    return f"`{name}`"


def classification_table() -> str:
    rows = []
    for name in members()["vit-classification"]:
        model = build(name)
        rows.append((_model_cell(name), describe_branches(model), _interactions_cell(model), _int(count(model)),
                     _published_cell(name), _tags_cell(name), _result_cell(name)))
    header = ("model", "branches (B1 ... Bn)", "interactions", "#params", "published #params / MACs", "tags",
              "ImageNet-1k top-1 (official)")
    return markdown_table(header, rows, "lllrlll")


def dense_table(family: str, result_header: str) -> str:
    rows = []
    for name in members()[family]:
        model = build(name)
        pyramid = model.fpn if model.fpn is not None else nn.Module()
        rows.append((_model_cell(name), describe_branches(model, windows=True), _interactions_cell(model),
                     _int(count(model)), _int(count(pyramid)), _published_cell(name), _tags_cell(name),
                     _result_cell(name)))
    header = ("model", "branches (B1 ... Bn, window)", "interactions", "#params", "of which pyramid",
              "published #params / MACs", "tags", result_header)
    return markdown_table(header, rows, "lllrrlll")


def llava_table() -> str:
    rows = []
    for name in members()["llava"]:
        model = build(name)
        size = model.branch_sizes[-1]
        with torch.no_grad():
            tokens = model(torch.empty(1, 3, size, size, device="meta")).shape
        rows.append((_model_cell(name), describe_branches(model), _interactions_cell(model),
                     f"{tokens[1]} x {tokens[2]}", _int(count(model) - count(model.projector)),
                     _int(count(model.projector)), _published_cell(name), _tags_cell(name)))
    header = ("model", "branches (B1, B2)", "interactions", "visual tokens", "tower #params", "projector #params",
              "published tower MACs", "tags")
    return markdown_table(header, rows, "lllrrrll")


def llava_scores_table() -> str:
    rows = []
    for tag, (llm, data, scores) in LLAVA_SCORES.items():
        repo = timm.get_pretrained_cfg(tag).hf_hub_id
        rows.append((f"`{tag}`", f"[`{repo}`](https://huggingface.co/{repo})", llm, data,
                     *(f"{s:.1f}" for s in scores)))
    return markdown_table(("tag", "released model", "LLM", "data", *LLAVA_BENCHMARKS), rows,
                          "llll" + "r" * len(LLAVA_BENCHMARKS))


def branch_weights_table(family: str) -> str:
    """Every timm model the family's branches use, with the weights its ``branches`` tag loads."""
    names = sorted({b for name in members()[family] for b in _branch_names(name)}, key=lambda b: (branch_label(b), b))
    rows = []
    for branch in names:
        repo = timm.get_pretrained_cfg(branch).hf_hub_id
        rows.append((branch_label(branch), f"`{branch}`", f"[`{repo}`](https://huggingface.co/{repo})"))
    return markdown_table(("branch", "timm model", "weights (Hub)"), rows)


def internvit_backbone_table() -> str:
    name = "internvit_6b_patch14_224"
    with _SkipMetaInit():
        model = timm.create_model(name, device="meta")
    cfg = timm.get_pretrained_cfg(f"{name}.internvl")
    return markdown_table(
        ("timm model", "#params", "tag", "weights (Hub)"),
        [(f"`{name}`", _int(count(model)), f"`{cfg.tag}`", f"`{cfg.hf_hub_id}` / `{cfg.hf_hub_filename}`")], "lrll")


def released_table() -> str:
    rows = []
    for family in FAMILIES:
        for name in members()[family.key]:
            for full in released(name):
                cfg = timm.get_pretrained_cfg(full)
                result = OFFICIAL_RESULTS.get(name, "") if family.key != "llava" else f"avg {LLAVA_SCORES[full][2][-1]}"
                rows.append((f"`{full}`", f"`{cfg.hf_hub_id}`", f"`{cfg.hf_hub_filename}`", result or "-"))
    return markdown_table(("tag", "repo", "file", "official result"), rows)


def overview_table(page: str) -> str:
    """The families with links to their pages, relative to ``page`` (a path in the repository)."""
    rows = []
    for family in FAMILIES:
        names = members()[family.key]
        count_released = sum(len(released(name)) for name in names)
        link = posixpath.relpath(f"docs/{family.page}", posixpath.dirname(page) or ".")
        rows.append((f"[{family.title}]({link})", str(len(names)), str(count_released)))
    return markdown_table(("family", "models", "released checkpoints"), rows, "lrr")


# ----------------------------------------------------------------------------------------------------------------------
# Pages


# page (relative to the repository) -> block name -> table builder
BLOCKS: dict[str, dict[str, Callable[[], str]]] = {
    "README.md": {"families": lambda: overview_table("README.md")},
    "docs/models/index.md": {"families": lambda: overview_table("docs/models/index.md")},
    "docs/models/vit-classification.md": {
        "models": classification_table,
        "branch-weights": lambda: branch_weights_table("vit-classification"),
    },
    "docs/models/vit-detection.md": {
        "models": lambda: dense_table("vit-detection", "COCO box / mask AP (official)"),
        "branch-weights": lambda: branch_weights_table("vit-detection"),
    },
    "docs/models/internvit-6b.md": {
        "models": lambda: dense_table("internvit", "official result (COCO box / mask AP, ADE20K mIoU)"),
        "internvit": internvit_backbone_table,
        "branch-weights": lambda: branch_weights_table("internvit"),
    },
    "docs/models/convnext.md": {
        "models": lambda: dense_table("convnext", "COCO box / mask AP (official)"),
        "branch-weights": lambda: branch_weights_table("convnext"),
    },
    "docs/models/llava.md": {
        "models": llava_table,
        "scores": llava_scores_table,
        "branch-weights": lambda: branch_weights_table("llava"),
    },
    "docs/pretrained.md": {"released": released_table},
}

_BLOCK = re.compile(r"(<!-- BEGIN GENERATED: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- END GENERATED: (?P=name) -->)",
                    re.DOTALL)


def render(text: str, builders: dict[str, Callable[[], str]], page: str) -> str:
    """``text`` with every generated block replaced by its builder's table.

    Raises:
        ValueError: A builder whose block is missing from the page, or a block without a builder.
    """
    found = set()

    def replace(match: re.Match) -> str:
        name = match["name"]
        if name not in builders:
            raise ValueError(f"{page}: generated block {name!r} has no builder in docs/gen_tables.py")
        found.add(name)
        return f"{match[1]}{builders[name]()}\n{match[4]}"

    text = _BLOCK.sub(replace, text)
    missing = set(builders) - found
    if missing:
        raise ValueError(f"{page}: no generated block for {sorted(missing)} (<!-- BEGIN GENERATED: NAME --> ...)")
    return text


def render_pages(root: Path = ROOT) -> dict[str, tuple[str, str]]:
    """Page -> (committed text, text regenerated from the code)."""
    pages = {}
    for page, builders in BLOCKS.items():
        text = (root / page).read_text()
        pages[page] = (text, render(text, builders, page))
    return pages


def stale_pages(root: Path = ROOT) -> dict[str, str]:
    """Page -> unified diff from the committed text to the regenerated one, for every page that differs."""
    return {
        page: "".join(difflib.unified_diff(old.splitlines(True), new.splitlines(True), page, f"{page} (generated)"))
        for page, (old, new) in render_pages(root).items()
        if old != new
    }


def check_data() -> list[str]:
    """Problems of the data tables: released tags without an official result, entries for unknown models/tags."""
    problems = []
    names = set(piip_models.list_models())
    problems += [f"OFFICIAL_RESULTS names {n}, not a registered model" for n in OFFICIAL_RESULTS if n not in names]
    for name in sorted(names):
        for full in released(name):
            if name.startswith("piip_llava_"):
                if full not in LLAVA_SCORES:
                    problems.append(f"{full} is released but has no LLAVA_SCORES entry")
            elif name not in OFFICIAL_RESULTS:
                problems.append(f"{full} is released but {name} has no OFFICIAL_RESULTS entry")
    problems += [
        f"LLAVA_SCORES names {tag}, not a released tag"
        for tag in LLAVA_SCORES
        if not fnmatch.fnmatch(tag, "piip_llava_*.*") or tag not in released(tag.partition(".")[0])
    ]
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="report stale pages instead of writing them")
    args = parser.parse_args(argv)
    problems = check_data()
    for problem in problems:
        print(problem, file=sys.stderr)
    if args.check:
        stale = stale_pages()
        for diff in stale.values():
            sys.stdout.write(diff)
        return int(bool(stale or problems))
    for page, (old, new) in render_pages().items():
        if old != new:
            (ROOT / page).write_text(new)
            print(f"updated {page}")
    return int(bool(problems))


if __name__ == "__main__":
    sys.exit(main())
