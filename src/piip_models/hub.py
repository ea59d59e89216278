"""Released PIIP checkpoints on the Hugging Face Hub: verified downloads, safe reading and Hub-format export.

* :func:`fetch_checkpoint` downloads a released file (a ``.safetensors`` sibling first, when the repo has one) and
  checks it against the Hub's content hash; with ``HF_HUB_OFFLINE=1`` and no cached copy it fails at once, naming the
  repo and file to fetch. For a sharded checkpoint (a transformers ``*.index.json``, as the PIIP-LLaVA repos hold) it
  fetches only the shards holding tensors PIIP loads (a LLaVA model's vision tower and projector).
* :func:`read_checkpoint` reads safetensors, or pickles with ``torch.load(weights_only=True)``: tensors, containers
  and a few metadata types only; a pickle that needs anything else (code) is refused, never executed. An index file
  reads the tensors PIIP loads from its shards.
* :func:`load_checkpoint` reads a file that way and loads it into a model through the checkpoint filters of
  :mod:`piip_models.weights`, checked before anything is copied.
* :func:`read_model_config` checks a timm ``config.json`` (``local-dir:`` folders, ``hf-hub:`` repos) and
  :func:`fetch_pretrained` the Hub file timm reads for a branch's own pretrained weights, before any model is built.

Every failure to read is a :class:`CheckpointError` naming the file; a shard of a sharded checkpoint is read only
from the index's own folder (or, in the Hugging Face cache, its repo's blobs).

Conversion to the Hub format, which builds models, lives above the models in :mod:`piip_models.convert`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import posixpath
import re
import zipfile
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import fields, replace
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import safetensors.torch
import torch
import torch.nn as nn
from huggingface_hub import constants as hf_constants
from huggingface_hub import hf_hub_download
from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError
from safetensors import SafetensorError
from timm.models import PretrainedCfg, resolve_pretrained_cfg, split_model_name_tag
from timm.models._hub import _EXT_PRIORITY, _PREFERRED_FILES

from .weights import checkpoint_filter_fn, keys_to_load, report_dropped

__all__ = [
    "OFFICIAL_REPO",
    "CheckpointError",
    "CheckpointNotFoundError",
    "UnsafeCheckpointError",
    "check_safetensors",
    "fetch_checkpoint",
    "fetch_model_config",
    "fetch_pretrained",
    "is_sharded_index",
    "load_checkpoint",
    "official_checkpoint",
    "prepare_pretrained_cfg",
    "read_checkpoint",
    "read_model_config",
    "verify_cached_file",
]

OFFICIAL_REPO = "OpenGVLab/PIIP"
_PICKLE_SUFFIXES = (".pth", ".pt", ".bin")
# timm's Hub weights and the safetensors files it reads instead when a repo has them
_TIMM_WEIGHTS = "pytorch_model.bin"
_TIMM_SAFE_SIBLINGS = {_TIMM_WEIGHTS: "model.safetensors", "open_clip_pytorch_model.bin": "open_clip_model.safetensors"}
# A torch checkpoint is a zip archive (perhaps truncated) or a pickle, which starts with the PROTO opcode (protocol
# 2+, as torch.save writes).
_CHECKPOINT_MAGIC = (b"PK\x03\x04", b"\x80")
# transformers' sharded checkpoints: the safetensors index first, the pickle index of older uploads second
_SAFETENSORS_INDEX = "model.safetensors.index.json"
_PICKLE_INDEX = "pytorch_model.bin.index.json"
_INDEX_SUFFIX = ".index.json"
_SHA256 = re.compile(r"[0-9a-f]{64}")
_GIT_SHA1 = re.compile(r"[0-9a-f]{40}")
_HASH_CHUNK = 1 << 24
_verified_files: set[tuple[str, int, int]] = set()


class CheckpointError(RuntimeError):
    """A checkpoint file cannot be used: not cached while offline, truncated, corrupt or not a checkpoint."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A checkpoint file (or a model folder's ``config.json``) does not exist."""


class UnsafeCheckpointError(CheckpointError):
    """A pickled checkpoint needs code (pickle globals outside the weights-only allowlist) to be read."""


def is_sharded_index(filename: str | os.PathLike) -> bool:
    """Whether a file name is a transformers sharded-checkpoint index (``*.index.json``)."""
    return str(filename).endswith(_INDEX_SUFFIX)


def official_checkpoint(path: str, repo_id: str = OFFICIAL_REPO) -> dict[str, str]:
    """``pretrained_cfg`` entries for a released file: ``classification/x.pth`` of ``OpenGVLab/PIIP``, or a sharded
    model's index (``model.safetensors.index.json``) in its own repo."""
    return dict(hf_hub_id=repo_id, hf_hub_filename=path)


def _metadata_globals() -> list[Any]:
    """Types training scripts store beside the weights (DeiT's argparse ``args``, numpy scalars in mmcv ``meta``).

    Their pickle reconstruction only builds values; nothing from the file runs.
    """
    allowed: list[Any] = [argparse.Namespace]
    try:
        import numpy as np
    except ImportError:
        return allowed
    codes = np.typecodes["AllInteger"] + np.typecodes["AllFloat"] + "?"
    allowed += [np.dtype, *sorted({type(np.dtype(c)) for c in codes}, key=str)]
    if hasattr(np, "_core"):  # numpy 2; files written under numpy 1 name the scalar constructor numpy.core...
        return allowed + [np._core.multiarray.scalar, (np._core.multiarray.scalar, "numpy.core.multiarray.scalar")]
    return allowed + [np.core.multiarray.scalar]


def _check_file(path: Path, what: str = "checkpoint") -> None:
    """Raises unless ``path`` is (or links to) an existing regular file."""
    if not path.exists():
        broken = " (a broken link)" if path.is_symlink() else ""
        raise CheckpointNotFoundError(f"{what} {path} does not exist{broken}")
    if not path.is_file():
        raise CheckpointError(f"{what} {path} is not a file" + (" but a directory" if path.is_dir() else ""))


def check_safetensors(path: str | os.PathLike) -> None:
    """Checks that a safetensors file is complete and well-formed: its header describes exactly the bytes on disk and
    every tensor's dtype, shape and offsets agree.

    Raises:
        CheckpointError: The file is missing, truncated, corrupt or not a safetensors file.
    """
    path = Path(path)
    _check_file(path)
    size = path.stat().st_size
    with path.open("rb") as f:
        prefix = f.read(8)
        header_len = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if not 0 < header_len <= size - 8:
            raise CheckpointError(f"{path} is truncated or not a safetensors file ({size} bytes, no complete header)")
        try:
            header = json.loads(f.read(header_len))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
            raise CheckpointError(f"{path} is corrupt: unreadable safetensors header ({e})") from e
    if not isinstance(end, int) or 8 + header_len + end != size:
        raise CheckpointError(
            f"{path} is truncated or corrupt: its header describes {8 + header_len + end} bytes, the file has {size}"
        )
    try:
        with safetensors.safe_open(path, framework="pt", device="cpu"):
            pass  # opening parses the header: dtypes, shapes and offsets that disagree are refused
    except SafetensorError as e:
        raise CheckpointError(f"{path} is corrupt: {e}") from e


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Reads a checkpoint file without executing anything from it.

    ``.safetensors`` files are checked for completeness and read with safetensors; anything else goes through
    ``torch.load(weights_only=True)`` (memory-mapped for zip checkpoints), which rebuilds only tensors, containers,
    primitive values, ``argparse.Namespace`` and numpy scalars.

    A transformers index (``*.index.json``) is read as the checkpoint of its shards, which must lie in its folder
    (links included; in the Hugging Face cache, its repo's blobs): only the tensors
    :func:`piip_models.weights.keys_to_load` selects are read, so a LLaVA model's language model is never loaded.

    Raises:
        CheckpointNotFoundError: The file does not exist.
        UnsafeCheckpointError: The pickle needs other globals (code); it is refused, not run.
        CheckpointError: The file is a folder, truncated, corrupt, not a checkpoint or holds no tensors; an index
            is malformed or names a shard outside its folder, a missing shard or a tensor its shard lacks.
    """
    path = Path(path)
    _check_file(path)
    if is_sharded_index(path.name):
        return _read_sharded(path)
    if path.suffix == ".safetensors":
        check_safetensors(path)
        try:
            return safetensors.torch.load_file(path, device="cpu")
        except SafetensorError as e:
            raise CheckpointError(f"{path} is corrupt: {e}") from e
    mmap = zipfile.is_zipfile(path)
    if not mmap:
        with path.open("rb") as f:
            start = f.read(16)
        if not start.startswith(_CHECKPOINT_MAGIC):
            raise CheckpointError(
                f"{path} is not a PyTorch checkpoint: neither a zip archive nor a pickle (it starts with {start!r})"
            )
    try:
        with torch.serialization.safe_globals(_metadata_globals()):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        detail = str(e).partition("WeightsUnpickler error:")[2].strip().split("\n")[0] or str(e).split("\n")[0]
        needs = ", ".join(a or b for a, b in re.findall(r"GLOBAL (\S+)|but got <class '([^']+)'>", detail))
        if needs or "Unsupported operand" in detail:
            what = f"calls {needs}" if needs else f"uses pickle instructions it cannot check ({detail})"
            raise UnsafeCheckpointError(
                f"refused to read {path}: its pickle {what}, outside torch's weights-only allowlist, so reading it "
                "could run code from the file. piip-models never unpickles code; if you trust the file, re-save its "
                "tensors as safetensors in an environment you trust"
            ) from None  # torch's own message suggests weights_only=False
        raise CheckpointError(f"{path} is truncated or corrupt: {detail}") from e
    except MemoryError:
        raise
    except Exception as e:  # anything else the unpickler trips over in a damaged or crafted file
        raise CheckpointError(f"{path} is truncated or not a PyTorch checkpoint: {type(e).__name__}: {e}") from e
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f"{path} holds a {type(checkpoint).__name__}, not a state dict")
    if not _holds_tensors(checkpoint):
        raise CheckpointError(f"{path} holds no tensors (keys: {sorted(map(str, checkpoint))[:10]})")
    return dict(checkpoint)


def _holds_tensors(checkpoint: Mapping[str, Any], depth: int = 2) -> bool:
    """Whether a checkpoint holds a tensor at its top level or inside a wrapper (``model``, ``state_dict``, ...)."""
    return any(
        isinstance(v, torch.Tensor) or (depth > 0 and isinstance(v, Mapping) and _holds_tensors(v, depth - 1))
        for v in checkpoint.values()
    )


def _check_shard_name(index: Path, key: str, shard: Any) -> str:
    """A shard name of an index: a checkpoint file (not another index) inside the index's folder (no ``..``, no
    absolute path)."""
    if not isinstance(shard, str) or not shard or is_sharded_index(shard):
        raise CheckpointError(f"{index} puts {key!r} in the shard {shard!r}, which is not a checkpoint file name")
    for pure in (PurePosixPath(shard), PureWindowsPath(shard)):
        if pure.anchor or ".." in pure.parts:
            raise CheckpointError(
                f"{index} puts {key!r} in the shard {shard!r}, outside the index's folder; refused (shards must be "
                "files beside the index)"
            )
    return shard


def _shard_roots(folder: Path) -> list[Path]:
    """Where an index's shards may lie: its folder and, for an index in a Hugging Face cache snapshot
    (``models--org--name/snapshots/<revision>/``), the blobs its snapshot links point to."""
    roots = [folder.resolve()]
    for parent in (folder, *folder.parents):
        if parent.parent.name == "snapshots" and parent.parent.parent.name.startswith("models--"):
            roots.append((parent.parent.parent / "blobs").resolve())
            break
    return roots


def _shards_to_read(index: Path) -> tuple[dict[str, list[str]], list[str]]:
    """From a transformers index (``{"weight_map": {key: shard}}``): shard file -> the keys to load from it, and the
    keys left out (a LLaVA model's language model)."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not isinstance(weight_map, Mapping) or not all(isinstance(k, str) for k in weight_map):
            raise TypeError(f"weight_map is a {type(weight_map).__name__}, not an object of tensor names")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{index} is not a sharded-checkpoint index (no weight_map of key -> shard: {e})") from e
    keys = keys_to_load(weight_map)
    if not keys:
        raise CheckpointError(f"{index} is not a sharded-checkpoint index: its weight_map names no tensor")
    shards = defaultdict(list)
    for key in keys:
        shards[_check_shard_name(index, key, weight_map[key])].append(key)
    return dict(shards), sorted(set(weight_map) - set(keys))


def _read_sharded(index: Path) -> dict[str, torch.Tensor]:
    shards, left_out = _shards_to_read(index)
    roots = _shard_roots(index.parent)
    report_dropped(f"read the vision tower and projector of the LLaVA checkpoint {index.name}", left_out)
    state_dict = {}
    for shard, keys in sorted(shards.items()):
        path = index.parent / shard
        if not path.exists():
            raise CheckpointError(f"{path} is missing: {index.name} puts {len(keys)} tensors to load there")
        target = path.resolve()
        if not any(target.is_relative_to(root) for root in roots):
            raise CheckpointError(
                f"{path} links to {target}, outside the folder of {index.name}; refused (shards must be files beside "
                "the index)"
            )
        if path.suffix == ".safetensors":
            check_safetensors(path)
            with safetensors.safe_open(path, framework="pt", device="cpu") as f:
                missing = sorted(set(keys) - set(f.keys()))
                if not missing:
                    state_dict.update({k: f.get_tensor(k) for k in keys})  # only these are read from the file
        else:
            tensors = read_checkpoint(path)
            missing = sorted(set(keys) - set(tensors))
            state_dict.update({k: tensors[k] for k in keys if k in tensors})
        if missing:
            raise CheckpointError(f"{path} lacks {len(missing)} tensors {index.name} puts there, e.g. {missing[0]}")
    return state_dict


def verify_cached_file(path: str | os.PathLike) -> bool:
    """Checks a file of the Hugging Face cache against its content address.

    The cache stores each file as ``blobs/<etag>``: the sha256 the Hub lists for LFS files, the git blob sha1 for
    small ones. Both are recomputed here (once per process and file version).

    Returns:
        True if verified, False if the file has no content address (a cache without symlinks, or a local file).

    Raises:
        CheckpointError: The content does not match the Hub's hash (truncated or corrupt download).
    """
    blob = Path(os.path.realpath(path))
    stat = blob.stat()
    key = (str(blob), stat.st_size, stat.st_mtime_ns)
    if key in _verified_files:
        return True
    if _SHA256.fullmatch(blob.name):
        algorithm, digest = "sha256", hashlib.sha256()
    elif _GIT_SHA1.fullmatch(blob.name):
        algorithm, digest = "git blob sha1", hashlib.sha1(b"blob %d\0" % stat.st_size)
    else:
        return False
    with blob.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    if digest.hexdigest() != blob.name:
        raise CheckpointError(
            f"{path} is corrupt or truncated ({stat.st_size} bytes): its {algorithm} is {digest.hexdigest()}, the "
            f"Hub's is {blob.name}; delete {blob} and download it again"
        )
    _verified_files.add(key)
    return True


def _download(
    repo_id: str, filename: str, revision: str | None, cache_dir: str | os.PathLike | None, local_only: bool
) -> Path:
    path = hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir, local_files_only=local_only)
    verify_cached_file(path)
    return Path(path)


def _candidates(filename: str) -> tuple[str, ...]:
    """Files to try for ``filename``, safetensors first: a ``.safetensors`` sibling of a pickle, the pickle index of
    a safetensors index (older transformers uploads)."""
    stem, suffix = os.path.splitext(filename)
    if posixpath.basename(filename) in _TIMM_SAFE_SIBLINGS:
        return posixpath.join(posixpath.dirname(filename), _TIMM_SAFE_SIBLINGS[posixpath.basename(filename)]), filename
    if suffix in _PICKLE_SUFFIXES:
        return stem + ".safetensors", filename
    if posixpath.basename(filename) == _SAFETENSORS_INDEX:
        return filename, filename[: -len(_SAFETENSORS_INDEX)] + _PICKLE_INDEX
    return (filename,)


def _timm_candidates(filename: str) -> tuple[str, ...]:
    """The files timm's Hub loader tries for ``filename``, in its order: a ``.bin``'s safetensors sibling first."""
    if posixpath.basename(filename) in _TIMM_SAFE_SIBLINGS or filename.endswith(".bin"):
        return _candidates(filename)
    return (filename,)


def _not_cached(
    repo_id: str,
    candidates: Iterable[str],
    cache_dir: str | os.PathLike | None,
    what: str = "",
    remedy: str = "or pass the local file: pretrained_cfg_overlay=dict(file='.../{name}')",
) -> CheckpointError:
    *others, filename = candidates  # the one asked for comes last; its safetensors sibling would do as well
    cache = cache_dir or hf_constants.HF_HUB_CACHE
    why = "HF_HUB_OFFLINE=1" if hf_constants.HF_HUB_OFFLINE else "the Hub could not be reached"
    alternatives = f" (nor its safetensors sibling {', '.join(others)})" if others else ""
    return CheckpointError(
        f"{repo_id}/{filename}{alternatives}{what} is not in the Hugging Face cache ({cache}) and {why}. Fetch it on a "
        f"connected machine with `hf download {repo_id} {filename}` into that cache (HF_HUB_CACHE), "
        + remedy.format(name=os.path.basename(filename))
    )


def _fetch(
    repo_id: str,
    candidates: tuple[str, ...],
    revision: str | None,
    cache_dir: str | os.PathLike | None,
    what: str = "",
    remedy: str | None = None,
) -> Path:
    """The first of ``candidates`` the repo (or, offline, the cache) has, downloaded and verified."""
    local_only = False
    *preferred, last = candidates
    for candidate in preferred:
        try:
            return _download(repo_id, candidate, revision, cache_dir, local_only)
        except LocalEntryNotFoundError:  # (a subclass of EntryNotFoundError)
            local_only = True  # the Hub is unreachable: only the cache can serve the alternative
        except EntryNotFoundError:
            pass  # the repo has no file of the preferred format
    try:
        return _download(repo_id, last, revision, cache_dir, local_only)
    except LocalEntryNotFoundError as e:
        raise _not_cached(repo_id, candidates, cache_dir, what, *([remedy] if remedy else [])) from e


def fetch_checkpoint(
    repo_id: str,
    filename: str,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """Downloads (or finds in the cache) a Hub file and verifies it against the Hub's hash.

    For ``.pth``/``.pt``/``.bin`` files a ``.safetensors`` file of the same name is preferred when the repo (or the
    cache, offline) has one (``model.safetensors`` for transformers' ``pytorch_model.bin``). A
    ``model.safetensors.index.json`` falls back to ``pytorch_model.bin.index.json``; for an index the shards holding
    tensors PIIP loads are fetched (and verified) too, the others are not.

    Args:
        repo_id: Hub repository, ``OpenGVLab/PIIP`` for the released checkpoints.
        filename: Path inside the repository.
        revision: Branch, tag or commit.
        cache_dir: Hugging Face cache folder (default: ``HF_HUB_CACHE``).

    Returns:
        The local path of the verified file (of the index for a sharded checkpoint).

    Raises:
        CheckpointError: Offline (``HF_HUB_OFFLINE=1`` or no connection) without a cached copy, naming the file to
            fetch; a corrupt download; an index naming shards outside its folder.
    """
    path = _fetch(repo_id, _candidates(filename), revision, cache_dir)
    if is_sharded_index(path.name):
        folder = posixpath.dirname(filename)
        for shard in sorted(_shards_to_read(path)[0]):
            _fetch(repo_id, (posixpath.join(folder, shard),), revision, cache_dir, f" (a shard of {path.name})")
    return path


def _check_weights_file(path: Path) -> None:
    """Reads enough of a weights file to know it loads: a safetensors header, or a (memory-mapped) pickle."""
    if path.suffix == ".safetensors":
        check_safetensors(path)
    else:
        read_checkpoint(path)


def _local_dir_weights(folder: Path) -> Path:
    """The weights file timm's ``local-dir:`` loader picks in ``folder`` (its preferred names, then the first file
    of each extension in its order)."""
    if not folder.is_dir():
        raise CheckpointNotFoundError(f"model folder {folder} does not exist or is not a folder")
    for name in _PREFERRED_FILES:
        if (folder / name).exists():
            return folder / name
    for ext in _EXT_PRIORITY:
        files = sorted(folder.glob(f"*{ext}"))
        if files:
            return files[0]
    raise CheckpointNotFoundError(
        f"model folder {folder} holds no weights (model.safetensors, pytorch_model.bin or another "
        f"{'/'.join(_EXT_PRIORITY)} file)"
    )


def prepare_pretrained_cfg(cfg: PretrainedCfg, cache_dir: str | os.PathLike | None = None) -> PretrainedCfg:
    """Routes a ``pretrained=True`` load through the verified, safe paths before timm loads anything (and before the
    model is built).

    * Tags with a Hub file (and ``file`` overrides) are fetched and verified here; the returned cfg points timm at
      the local file with ``custom_load``, so ``PIIP.load_pretrained`` reads it with :func:`read_checkpoint`.
    * ``hf-hub:`` repos: their weights (``model.safetensors``, else ``pytorch_model.bin``) are fetched, verified
      and checked to read; ``local-dir:`` folders: the weights file timm will read is checked. timm then reads
      them (safetensors, or ``torch.load(weights_only=True)``).

    Raises:
        CheckpointError: Offline without a cached copy (naming the repo and file), a missing, corrupt or unsafe
            file.
    """
    if cfg.source == "hf-hub":
        repo_id, _, revision = cfg.hf_hub_id.partition("@")
        _check_weights_file(_fetch(repo_id, _candidates(_TIMM_WEIGHTS), revision or None, cache_dir))
        return cfg
    if cfg.source == "local-dir":
        _check_weights_file(_local_dir_weights(Path(cfg.file)))
        return cfg
    if cfg.state_dict is not None or not (cfg.file or cfg.hf_hub_id):
        return cfg
    file = cfg.file
    if not file:
        repo_id, _, revision = cfg.hf_hub_id.partition("@")
        file = fetch_checkpoint(
            repo_id, cfg.hf_hub_filename or "model.safetensors", revision=revision or None, cache_dir=cache_dir
        )
    return replace(cfg, file=str(file), custom_load=True)


def fetch_pretrained(model_name: str, cache_dir: str | os.PathLike | None = None) -> None:
    """Makes sure timm can load a timm model's own pretrained weights (a PIIP branch's): the Hub file timm reads for
    ``model_name`` (with its tag, or the default one) is fetched, or found in the cache offline, and verified.

    Weights timm downloads from a plain URL (no Hub repo) are left to timm.

    Raises:
        CheckpointError: The tag has no pretrained weights, or they are not cached while offline (naming the repo
            and file).
    """
    arch, tag = split_model_name_tag(model_name)
    cfg = resolve_pretrained_cfg(arch, pretrained_cfg=tag or None)
    if not cfg.has_weights:
        raise CheckpointError(f"timm has no pretrained weights for {model_name}; build it with pretrained=False")
    if not cfg.hf_hub_id or cfg.file or cfg.state_dict is not None:
        return
    repo_id, _, revision = cfg.hf_hub_id.partition("@")
    filename = cfg.hf_hub_filename or _TIMM_WEIGHTS
    _fetch(repo_id, _timm_candidates(filename), revision or None, cache_dir, f" ({model_name}'s pretrained weights)",
           "or build without pretrained branch weights (pretrained=False)")


# What timm's older flat config layout (no pretrained_cfg object) holds beside pretrained cfg fields.
_FLAT_CONFIG_EXTRAS = ("architecture", "num_features", "labels")


def read_model_config(path: str | os.PathLike, architectures: Iterable[str]) -> dict[str, Any]:
    """Reads and checks a timm ``config.json`` (the config of a ``local-dir:`` folder or an ``hf-hub:`` repo)
    before timm builds anything from it.

    Args:
        path: The ``config.json``.
        architectures: The model names it may name.

    Raises:
        CheckpointError: Missing, not JSON, not an object, an ``architecture`` that is not one of ``architectures``,
            a ``pretrained_cfg`` or ``model_args`` that is not an object, fields timm's pretrained cfg does not
            have, or a ``num_classes`` or ``input_size`` that is not one.
    """
    path = Path(path)
    _check_file(path, "model config")
    try:
        config = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} holds a JSON {type(config).__name__}, not an object")
    architecture = config.get("architecture")
    if architecture not in set(architectures):
        missing = "" if "architecture" in config else " (the field is missing)"
        raise CheckpointError(f"{path}: 'architecture' must name a registered PIIP model, got {architecture!r}"
                              f"{missing}")
    if "pretrained_cfg" in config:
        cfg_fields, layout = config["pretrained_cfg"], "its 'pretrained_cfg'"
        sections = {"pretrained_cfg": cfg_fields, "model_args": config.get("model_args", {})}
    else:  # timm reads a config without a pretrained_cfg object as one flat pretrained cfg
        cfg_fields = {k: v for k, v in config.items() if k not in _FLAT_CONFIG_EXTRAS}
        layout = "it (no 'pretrained_cfg')"
        sections = {}
    for section, value in sections.items():
        if not isinstance(value, dict):
            raise CheckpointError(f"{path}: {section!r} must be an object of named values, got {value!r}")
    unknown = sorted(set(cfg_fields) - {f.name for f in fields(PretrainedCfg)})
    if unknown:
        raise CheckpointError(f"{path}: {layout} has fields timm's pretrained cfg does not know: {unknown}")
    for where in (config, cfg_fields):
        num_classes = where.get("num_classes", 0)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise CheckpointError(f"{path}: 'num_classes' must be a count of classes, got {num_classes!r}")
    input_size = cfg_fields.get("input_size", (3, 1, 1))
    if not (isinstance(input_size, (list, tuple)) and len(input_size) == 3
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in input_size)):
        raise CheckpointError(f"{path}: 'input_size' must be [channels, height, width], got {input_size!r}")
    return config


def fetch_model_config(repo_id: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The verified ``config.json`` of an ``hf-hub:`` repo (``org/name[@revision]``), downloaded or, offline, from
    the cache (else a :class:`CheckpointError` naming the repo and file)."""
    repo_id, _, revision = repo_id.partition("@")
    return _fetch(repo_id, ("config.json",), revision or None, cache_dir, remedy="or use its local copy: local-dir:")


def load_checkpoint(model: nn.Module, path: str | os.PathLike, strict: bool = True) -> None:
    """Loads an official or piip-models checkpoint file into ``model``, all or nothing.

    The file is read safely (:func:`read_checkpoint`), official layouts are converted and detector heads dropped
    (:func:`piip_models.weights.checkpoint_filter_fn`), and the result is checked against the model before any
    parameter changes: with ``strict`` every tensor must fit; without it missing and unexpected tensors are skipped,
    but a tensor of another shape or kind (integers for float weights) still raises
    :class:`~piip_models.weights.CheckpointMismatchError` with nothing copied.
    """
    state_dict = checkpoint_filter_fn(read_checkpoint(path), model, strict=strict)
    with torch.no_grad():
        model.load_state_dict(state_dict, strict=False)  # checked; classifiers for another class count stay
