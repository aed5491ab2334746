"""The snapshot format: one directory, a checksummed manifest, tensors in safetensors (no pickle).

Layout::

    <path>/
      manifest.json        {"format": "sterling-snapshot", "format_version": 1,
                            "created_at": "2026-01-01T00:00:00+00:00", "meta": {...},
                            "files": {"index.safetensors": {"sha256": "...", "bytes": 123}}}
      index.safetensors    one file per group of tensors

Writing is atomic: everything goes into a temporary directory beside the target, is fsynced, and
is renamed into place (an existing snapshot is first renamed aside, then removed). Reading checks
every listed file's size and sha256 and refuses any unlisted file, so a truncated, tampered or
half-copied snapshot is never loaded; tensors are read in the safetensors format (in place, see
:func:`parse_safetensors`), which executes no code.

Example::

    write_snapshot("snap", {"index": {"embeddings": torch.randn(10, 4)}}, meta={"dim": 4})
    snap = read_snapshot("snap")
    snap.tensors["index"]["embeddings"].shape  # torch.Size([10, 4])
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

FORMAT = "sterling-snapshot"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SUFFIX = ".safetensors"

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class SnapshotError(ValueError):
    """A snapshot that cannot be trusted or read: missing, malformed, corrupt or modified."""


@dataclass(frozen=True)
class Snapshot:
    """A verified, loaded snapshot.

    Args:
        path (Path): the snapshot directory.
        manifest (dict): the parsed ``manifest.json``.
        meta (dict): the caller's JSON metadata (``manifest["meta"]``).
        tensors (dict[str, dict[str, torch.Tensor]]): per file stem (``"index"`` for
            ``index.safetensors``), its tensors by name.
    """

    path: Path
    manifest: dict[str, Any]
    meta: dict[str, Any]
    tensors: dict[str, dict[str, torch.Tensor]]


def write_snapshot(
    path: str | os.PathLike[str],
    tensor_files: Mapping[str, Mapping[str, torch.Tensor]],
    meta: Mapping[str, Any],
    blobs: Mapping[str, bytes] | None = None,
) -> Path:
    """Writes a snapshot atomically, replacing an existing snapshot at ``path`` if there is one.

    Args:
        path (str | PathLike): the snapshot directory; its parent is created if needed.
        tensor_files (Mapping[str, Mapping[str, torch.Tensor]]): file stem -> tensors; the stem
            is a plain name (letters, digits, ``_ . -``) and becomes ``<stem>.safetensors``.
        meta (Mapping[str, Any]): JSON-serialisable metadata (vocabularies, configs).
        blobs (Mapping[str, bytes] | None): other files by name (e.g. an exported program),
            checksummed like the tensors but never parsed by :func:`read_snapshot`.

    Returns:
        Path: the snapshot directory.

    Raises:
        ValueError: a bad file stem or metadata that is not JSON.
        SnapshotError: ``path`` exists and is neither a snapshot nor an empty directory.
    """
    path = Path(path)
    for stem, tensors in tensor_files.items():
        if not isinstance(stem, str) or not _NAME.fullmatch(stem):
            raise ValueError(f"snapshot file name {stem!r} must match {_NAME.pattern}")
        for name, tensor in tensors.items():
            if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
                raise ValueError(
                    f"snapshot file {stem!r} needs str names and tensors, got {name!r}: {type(tensor).__name__}"
                )
    blobs = dict(blobs or {})
    for name, data in blobs.items():
        if not isinstance(name, str) or not _NAME.fullmatch(name) or name.endswith(SUFFIX) or name == MANIFEST:
            raise ValueError(
                f"snapshot blob name {name!r} must match {_NAME.pattern}, not be a tensor file or the manifest"
            )
        if not isinstance(data, bytes):
            raise ValueError(f"snapshot blob {name!r} must be bytes, got {type(data).__name__}")
    try:
        meta_json = json.loads(json.dumps(meta, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise ValueError(f"snapshot meta must be JSON-serialisable: {e}") from None
    if path.exists() or path.is_symlink():
        _check_replaceable(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        files = {}
        for stem, tensors in tensor_files.items():
            file = tmp / f"{stem}{SUFFIX}"
            safetensors.torch.save_file({name: t.detach().cpu().contiguous() for name, t in tensors.items()}, str(file))
            _fsync(file)
            files[file.name] = {"sha256": _sha256(file.read_bytes()), "bytes": file.stat().st_size}
        for name, data in blobs.items():
            (tmp / name).write_bytes(data)
            _fsync(tmp / name)
            files[name] = {"sha256": _sha256(data), "bytes": len(data)}
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "meta": meta_json,
            "files": files,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        _fsync(tmp / MANIFEST)
        _fsync(tmp)
        _swap_into_place(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def verify_snapshot(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Checks a snapshot without keeping its tensors; returns its manifest.

    Raises:
        SnapshotError: naming the file and the problem.
    """
    return _verify(Path(path), load=False)[0]


def read_snapshot(path: str | os.PathLike[str]) -> Snapshot:
    """Verifies and loads a snapshot (safetensors only: loading executes no code from it).

    Raises:
        SnapshotError: naming the file and the problem.
    """
    path = Path(path)
    manifest, tensors = _verify(path, load=True)
    return Snapshot(path, manifest, manifest["meta"], tensors)


def _verify(path: Path, load: bool) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
    manifest = read_manifest(path)
    listed = manifest["files"]
    for file in sorted(p.name for p in path.iterdir() if p.name != MANIFEST):
        if file not in listed:
            raise SnapshotError(f"unlisted file {file} in snapshot {path}; the snapshot was modified")
    tensors = {}
    for name, entry in listed.items():
        file = path / name
        if not file.is_file():
            raise SnapshotError(f"missing file {name} listed in the manifest of snapshot {path}")
        data = _read(file)
        _check_listed(name, entry, data)
        if load and name.endswith(SUFFIX):
            try:
                tensors[name[: -len(SUFFIX)]] = parse_safetensors(data)
            except ValueError as e:
                raise SnapshotError(f"cannot parse {name} in snapshot {path}: {e}") from None
    return manifest, tensors


def _check_listed(name: str, entry: Mapping[str, Any], data: bytes | torch.Tensor) -> None:
    """A SnapshotError unless ``data`` has the size and sha256 the manifest lists for file ``name``."""
    if len(data) != entry["bytes"]:
        raise SnapshotError(
            f"size mismatch for {name}: manifest {entry['bytes']} bytes, "
            f"file {len(data)} bytes; the snapshot is truncated or was modified"
        )
    digest = _sha256(data)
    if digest != entry["sha256"]:
        raise SnapshotError(
            f"checksum mismatch for {name}: manifest sha256 {entry['sha256'][:12]}..., "
            f"file sha256 {digest[:12]}...; the snapshot is corrupt or was modified"
        )


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The snapshot's manifest, its format checked (its files are not: :func:`verify_snapshot`).

    Raises:
        SnapshotError: not a directory, no manifest, or not a sterling manifest of a known version.
    """
    path = Path(path)
    if not path.is_dir():
        raise SnapshotError(f"snapshot {path} is not a directory")
    file = path / MANIFEST
    if not file.is_file():
        raise SnapshotError(f"snapshot {path} has no {MANIFEST}")
    try:
        manifest = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SnapshotError(f"{MANIFEST} of snapshot {path} is not valid JSON: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise SnapshotError(f"{MANIFEST} of snapshot {path} does not declare format '{FORMAT}'")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise SnapshotError(
            f"snapshot {path} has format_version {version!r}; this sterling reads version {FORMAT_VERSION}"
        )
    if not isinstance(manifest.get("meta"), dict) or not isinstance(manifest.get("files"), dict):
        raise SnapshotError(f"{MANIFEST} of snapshot {path} needs objects 'meta' and 'files'")
    for name, entry in manifest["files"].items():
        if not (isinstance(name, str) and _NAME.fullmatch(name) and name != MANIFEST):
            raise SnapshotError(f"{MANIFEST} of snapshot {path} lists an invalid file name {name!r}")
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("sha256"), str)
            and _SHA256.fullmatch(entry["sha256"])
            and isinstance(entry.get("bytes"), int)
            and not isinstance(entry["bytes"], bool)
        ):
            raise SnapshotError(f"{MANIFEST} of snapshot {path}: entry for {name} needs a hex 'sha256' and int 'bytes'")
    return manifest


def _check_replaceable(path: Path) -> None:
    """Refuses to replace anything but an existing snapshot or an empty directory."""
    if path.is_dir() and not path.is_symlink():
        if not any(path.iterdir()):
            return
        try:
            manifest = json.loads((path / MANIFEST).read_text())
            if isinstance(manifest, dict) and manifest.get("format") == FORMAT:
                return
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            pass
    raise SnapshotError(f"refusing to overwrite {path}: it exists and is not a sterling snapshot")


def _swap_into_place(tmp: Path, path: Path) -> None:
    """Renames ``tmp`` to ``path``; an existing ``path`` is renamed aside first, then removed."""
    aside = None
    if path.exists():
        aside = path.parent / f".{path.name}.old-{uuid.uuid4().hex}"
        os.rename(path, aside)
    try:
        os.rename(tmp, path)
    except BaseException:
        if aside is not None:
            os.rename(aside, path)
        raise
    _fsync(path.parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


#: safetensors dtype names → torch dtypes.
_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_MAX_HEADER = 100 << 20


def _read(file: Path) -> torch.Tensor:
    """uint8 ``[bytes]``: the file, read without holding the GIL for long (no zero-filling; the
    kernel copies), so a large snapshot loads beside a thread answering requests."""
    size = file.stat().st_size
    data = torch.empty(size, dtype=torch.uint8)
    view, done = memoryview(data.numpy()), 0
    with open(file, "rb", buffering=0) as f:
        while done < size and (n := f.readinto(view[done:])):
            done += n
    return data[:done]


def parse_safetensors(data: torch.Tensor | bytes | bytearray) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file's bytes (uint8 ``[bytes]``, or bytes), as views of them.

    ``safetensors.torch.load`` copies every tensor while holding the GIL (a third of a second for
    a 400 MB cache: a stall for every request a server answers meanwhile). The format is a length,
    a JSON header and raw little-endian data, so this reads it in place, with the same checks:
    known dtypes, shapes matching their byte ranges, ranges inside the data, contiguous and
    non-overlapping. A malformed file is a ValueError.
    """
    if not isinstance(data, torch.Tensor):
        data = torch.frombuffer(bytearray(data), dtype=torch.uint8) if len(data) else torch.empty(0, dtype=torch.uint8)
    if sys.byteorder != "little":  # pragma: no cover - the views below assume little-endian data
        return safetensors.torch.load(data.numpy().tobytes())
    if len(data) < 8:
        raise ValueError("shorter than the 8-byte header length")
    n = int.from_bytes(data[:8].numpy().tobytes(), "little")
    if n > min(_MAX_HEADER, len(data) - 8):
        raise ValueError(f"a header of {n} bytes in a file of {len(data)}")
    try:
        header = json.loads(data[8 : 8 + n].numpy().tobytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"the header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    header.pop("__metadata__", None)
    base, spans, out = 8 + n, [], {}
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = _DTYPES[info["dtype"]], info["shape"], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"tensor {name!r}: bad entry {info!r}") from None
        if (
            not isinstance(shape, list)
            or not all(isinstance(d, int) and d >= 0 for d in shape)
            or not all(isinstance(o, int) for o in (begin, end))
            or not 0 <= begin <= end <= len(data) - base
        ):
            raise ValueError(f"tensor {name!r}: bad shape {shape} or byte range [{begin}, {end})")
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise ValueError(f"tensor {name!r}: {end - begin} bytes for {shape} of {info['dtype']}")
        spans.append((begin, end))
        raw = data[base + begin : base + end]
        if (base + begin) % dtype.itemsize:  # unaligned: copy rather than view
            raw = raw.clone()
        out[name] = raw.view(dtype).view(shape)
    covered = 0
    for begin, end in sorted(spans):
        if begin != covered:
            raise ValueError(f"the tensors' byte ranges overlap or leave a gap at byte {covered}")
        covered = end
    if covered != len(data) - base:
        raise ValueError(f"the tensors cover {covered} of the {len(data) - base} data bytes")
    return out


def _sha256(data: bytes | torch.Tensor) -> str:
    return hashlib.sha256(data.numpy() if isinstance(data, torch.Tensor) else data).hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_blob(path: str | os.PathLike[str], name: str) -> bytes | None:
    """The bytes of the snapshot's file ``name`` (None if its manifest lists no such file), its
    size and sha256 checked against the manifest.

    Raises:
        SnapshotError: the file is missing, truncated or modified.
    """
    path = Path(path)
    entry = read_manifest(path)["files"].get(name)
    if entry is None:
        return None
    try:
        data = (path / name).read_bytes()
    except OSError as e:
        raise SnapshotError(f"cannot read {name} of snapshot {path}: {e}") from None
    _check_listed(name, entry, data)
    return data
