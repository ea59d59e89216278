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
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import torch.nn as nn
from huggingface_hub import constants as hf_constants
from huggingface_hub import hf_hub_download
from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError
from timm.models import PretrainedCfg

from .weights import checkpoint_filter_fn, keys_to_load, report_dropped

__all__ = [
    "OFFICIAL_REPO",
    "CheckpointError",
    "UnsafeCheckpointError",
    "check_safetensors",
    "fetch_checkpoint",
    "is_sharded_index",
    "load_checkpoint",
    "official_checkpoint",
    "prepare_pretrained_cfg",
    "read_checkpoint",
    "verify_cached_file",
]

OFFICIAL_REPO = "OpenGVLab/PIIP"
_PICKLE_SUFFIXES = (".pth", ".pt", ".bin")
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


def check_safetensors(path: str | os.PathLike) -> None:
    """Checks that a safetensors file is complete (its header describes exactly the bytes on disk).

    Raises:
        CheckpointError: The file is truncated or not a safetensors file.
    """
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as f:
        prefix = f.read(8)
        header_len = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if not 0 < header_len <= size - 8:
            raise CheckpointError(f"{path} is truncated or not a safetensors file ({size} bytes, no complete header)")
        try:
            header = json.loads(f.read(header_len))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, TypeError, KeyError, IndexError) as e:
            raise CheckpointError(f"{path} is corrupt: unreadable safetensors header ({e})") from e
    if 8 + header_len + end != size:
        raise CheckpointError(
            f"{path} is truncated or corrupt: its header describes {8 + header_len + end} bytes, the file has {size}"
        )


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Reads a checkpoint file without executing anything from it.

    ``.safetensors`` files are checked for completeness and read with safetensors; anything else goes through
    ``torch.load(weights_only=True)`` (memory-mapped for zip checkpoints), which rebuilds only tensors, containers,
    primitive values, ``argparse.Namespace`` and numpy scalars.

    A transformers index (``*.index.json``) is read as the checkpoint of its shards (which lie beside it):
    only the tensors :func:`piip_models.weights.keys_to_load` selects are read, so a LLaVA model's language model
    is never loaded.

    Raises:
        UnsafeCheckpointError: The pickle needs other globals (code); it is refused, not run.
        CheckpointError: The file is truncated, corrupt or holds no mapping of tensors; an index names a missing
            shard or a tensor its shard lacks.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if is_sharded_index(path.name):
        return _read_sharded(path)
    if path.suffix == ".safetensors":
        check_safetensors(path)
        return safetensors.torch.load_file(path, device="cpu")
    mmap = zipfile.is_zipfile(path)
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
    except (RuntimeError, EOFError, ValueError) as e:
        raise CheckpointError(f"{path} is truncated or not a PyTorch checkpoint: {e}") from e
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f"{path} holds a {type(checkpoint).__name__}, not a state dict")
    return dict(checkpoint)


def _shards_to_read(index: Path) -> tuple[dict[str, list[str]], list[str]]:
    """From a transformers index (``{"weight_map": {key: shard}}``): shard file -> the keys to load from it, and the
    keys left out (a LLaVA model's language model)."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        keys = keys_to_load(weight_map)
        shards = defaultdict(list)
        for key in keys:
            shards[weight_map[key]].append(key)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{index} is not a sharded-checkpoint index (no weight_map of key -> shard: {e})") from e
    return dict(shards), sorted(set(weight_map) - set(keys))


def _read_sharded(index: Path) -> dict[str, torch.Tensor]:
    shards, left_out = _shards_to_read(index)
    report_dropped(f"read the vision tower and projector of the LLaVA checkpoint {index.name}", left_out)
    state_dict = {}
    for shard, keys in sorted(shards.items()):
        path = index.parent / shard
        if not path.is_file():
            raise CheckpointError(f"{path} is missing: {index.name} puts {len(keys)} tensors to load there")
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
    if suffix in _PICKLE_SUFFIXES:
        return stem + ".safetensors", filename
    if posixpath.basename(filename) == _SAFETENSORS_INDEX:
        return filename, filename[: -len(_SAFETENSORS_INDEX)] + _PICKLE_INDEX
    return (filename,)


def _not_cached(repo_id: str, filename: str, cache_dir: str | os.PathLike | None, what: str = "") -> CheckpointError:
    cache = cache_dir or hf_constants.HF_HUB_CACHE
    why = "HF_HUB_OFFLINE=1" if hf_constants.HF_HUB_OFFLINE else "the Hub could not be reached"
    return CheckpointError(
        f"{repo_id}/{filename}{what} is not in the Hugging Face cache ({cache}) and {why}. Fetch it on a connected "
        f"machine with `hf download {repo_id} {filename}` into that cache (HF_HUB_CACHE), or pass the local "
        f"file: pretrained_cfg_overlay=dict(file='.../{os.path.basename(filename)}')"
    )


def fetch_checkpoint(
    repo_id: str,
    filename: str,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """Downloads (or finds in the cache) a Hub file and verifies it against the Hub's hash.

    For ``.pth``/``.pt``/``.bin`` files a ``.safetensors`` file of the same name is preferred when the repo (or the
    cache, offline) has one. A ``model.safetensors.index.json`` falls back to ``pytorch_model.bin.index.json``;
    for an index the shards holding tensors PIIP loads are fetched (and verified) too, the others are not.

    Args:
        repo_id: Hub repository, ``OpenGVLab/PIIP`` for the released checkpoints.
        filename: Path inside the repository.
        revision: Branch, tag or commit.
        cache_dir: Hugging Face cache folder (default: ``HF_HUB_CACHE``).

    Returns:
        The local path of the verified file (of the index for a sharded checkpoint).

    Raises:
        CheckpointError: Offline (``HF_HUB_OFFLINE=1`` or no connection) without a cached copy, naming the file to
            fetch; or a corrupt download.
    """
    local_only = False
    *preferred, last = _candidates(filename)
    path = None
    for candidate in preferred:
        try:
            path = _download(repo_id, candidate, revision, cache_dir, local_only)
            break
        except LocalEntryNotFoundError:  # (a subclass of EntryNotFoundError)
            local_only = True  # the Hub is unreachable: only the cache can serve the alternative
        except EntryNotFoundError:
            pass  # the repo has no file of the preferred format
    try:
        path = path or _download(repo_id, last, revision, cache_dir, local_only)
    except LocalEntryNotFoundError as e:
        raise _not_cached(repo_id, filename, cache_dir) from e
    if is_sharded_index(path.name):
        folder = posixpath.dirname(filename)
        for shard in sorted(_shards_to_read(path)[0]):
            shard = posixpath.join(folder, shard)
            try:
                _download(repo_id, shard, revision, cache_dir, local_only)
            except LocalEntryNotFoundError as e:
                raise _not_cached(repo_id, shard, cache_dir, f" (a shard of {path.name})") from e
    return path


def prepare_pretrained_cfg(cfg: PretrainedCfg, cache_dir: str | os.PathLike | None = None) -> PretrainedCfg:
    """Routes a ``pretrained=True`` load through the verified, safe paths before timm loads anything.

    * Tags with a Hub file (and ``file`` overrides) are fetched and verified here; the returned cfg points timm at
      the local file with ``custom_load``, so ``PIIP.load_pretrained`` reads it with :func:`read_checkpoint`.
    * ``hf-hub:`` repos: their ``model.safetensors`` is fetched and verified first (timm then reads it from the
      cache); ``local-dir:`` folders: their safetensors files are checked for completeness. timm reads both with
      safetensors (``.pth``/``.bin`` with ``torch.load(weights_only=True)``).
    """
    if cfg.source == "hf-hub":
        repo_id, _, revision = cfg.hf_hub_id.partition("@")
        try:
            _download(repo_id, "model.safetensors", revision or None, cache_dir, local_only=False)
        except EntryNotFoundError:
            pass  # a pickle-only repo: timm reads it with weights_only=True
        return cfg
    if cfg.source == "local-dir":
        for path in sorted(Path(cfg.file).glob("*.safetensors")):
            check_safetensors(path)
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


def load_checkpoint(model: nn.Module, path: str | os.PathLike, strict: bool = True) -> None:
    """Loads an official or piip-models checkpoint file into ``model``.

    The file is read safely (:func:`read_checkpoint`), official layouts are converted and detector heads dropped
    (:func:`piip_models.weights.checkpoint_filter_fn`). With ``strict`` a checkpoint that does not fit raises
    :class:`~piip_models.weights.CheckpointMismatchError` before any parameter changes.
    """
    state_dict = checkpoint_filter_fn(read_checkpoint(path), model, strict=strict)
    model.load_state_dict(state_dict, strict=False)  # already checked; classifiers for another class count stay
