"""The snapshot format: round trip, atomic replacement, and refusal of anything tampered with."""

from __future__ import annotations

import datetime
import hashlib
import json
import pickle
from pathlib import Path

import pytest
import safetensors.torch
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sterling.snapshot import (
    FORMAT,
    FORMAT_VERSION,
    Snapshot,
    SnapshotError,
    parse_safetensors,
    read_snapshot,
    verify_snapshot,
    write_snapshot,
)

TENSORS = {
    "index": {
        "embeddings": torch.randn(7, 3),
        "ids": torch.arange(7) * 3,
        "present": torch.tensor([True, False]),
        "empty": torch.zeros(0, dtype=torch.int32),
        "wide": torch.randn(2, 2, dtype=torch.float64),
    },
    "weights": {"w": torch.randn(4)},
}
META = {"vocab": ["Drama", 1995, "1995"], "config": {"block_size": 8}, "nested": [{"a": None}]}


def write(path: Path) -> Path:
    return write_snapshot(path, TENSORS, META)


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for stem in a:
        assert a[stem].keys() == b[stem].keys()
        for name in a[stem]:
            assert a[stem][name].dtype == b[stem][name].dtype
            assert torch.equal(a[stem][name], b[stem][name])


def test_round_trip(tmp_path: Path) -> None:
    path = write(tmp_path / "snap")
    snap = read_snapshot(path)
    assert isinstance(snap, Snapshot) and snap.path == path
    assert snap.meta == META
    assert_same_tensors(snap.tensors, TENSORS)
    manifest = json.loads((path / "manifest.json").read_text())
    assert snap.manifest == manifest == verify_snapshot(path)
    assert manifest["format"] == FORMAT == "sterling-snapshot" and manifest["format_version"] == FORMAT_VERSION == 1
    created = datetime.datetime.fromisoformat(manifest["created_at"])
    assert created.utcoffset() == datetime.timedelta(0)
    assert sorted(manifest["files"]) == ["index.safetensors", "weights.safetensors"]
    for name, entry in manifest["files"].items():
        data = (path / name).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["snap"]


def test_replace_existing_snapshot(tmp_path: Path) -> None:
    path = write(tmp_path / "snap")
    write_snapshot(path, {"other": {"x": torch.ones(2)}}, {"v": 2})
    snap = read_snapshot(path)
    assert snap.meta == {"v": 2} and list(snap.tensors) == ["other"]
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json", "other.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["snap"]  # no temp or set-aside dirs left


def test_writes_into_empty_dir_and_creates_parents(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert read_snapshot(write(tmp_path / "empty")).meta == META
    assert read_snapshot(write(tmp_path / "a" / "b")).meta == META


def test_refuses_to_overwrite_other_things(tmp_path: Path) -> None:
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(
        SnapshotError,
        match="refusing to overwrite .*mine: it exists and is not a sterling snapshot",
    ):
        write(other)
    assert (other / "notes.txt").read_text() == "keep me"
    file = tmp_path / "file"
    file.write_text("x")
    with pytest.raises(SnapshotError, match="refusing to overwrite"):
        write(file)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "mine"]


def test_failed_write_keeps_old_snapshot(tmp_path: Path) -> None:
    path = write(tmp_path / "snap")
    shared = torch.ones(4)  # safetensors refuses tensors sharing memory, midway through the write
    with pytest.raises(RuntimeError, match="share memory"):
        write_snapshot(path, {"a": {"x": torch.ones(1)}, "b": {"x": shared, "y": shared[:2]}}, {})
    assert read_snapshot(path).meta == META
    assert sorted(p.name for p in tmp_path.iterdir()) == ["snap"]


def test_write_validation(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="snapshot file name '../x' must match"):
        write_snapshot(tmp_path / "s", {"../x": {}}, {})
    with pytest.raises(ValueError, match="snapshot file 'w' needs str names and tensors, got 'x': str"):
        write_snapshot(tmp_path / "s", {"w": {"x": "not a tensor"}}, {})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="snapshot meta must be JSON-serialisable"):
        write_snapshot(tmp_path / "s", {}, {"x": object()})
    with pytest.raises(ValueError, match="snapshot meta must be JSON-serialisable"):
        write_snapshot(tmp_path / "s", {}, {"x": float("nan")})
    assert list(tmp_path.iterdir()) == []


def edit_manifest(path: Path, change) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    change(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))


def flip_byte(path: Path) -> None:
    data = bytearray((path / "index.safetensors").read_bytes())
    data[-3] ^= 0x01
    (path / "index.safetensors").write_bytes(bytes(data))


def truncate(path: Path) -> None:
    data = (path / "index.safetensors").read_bytes()
    (path / "index.safetensors").write_bytes(data[:-10])


def consistent_garbage(path: Path) -> None:
    data = b"this is not a safetensors file"
    (path / "weights.safetensors").write_bytes(data)
    edit_manifest(
        path,
        lambda m: m["files"].update(
            {
                "weights.safetensors": {
                    "sha256": hashlib.sha256(data).hexdigest(),
                    "bytes": len(data),
                }
            }
        ),
    )


@pytest.mark.parametrize(
    "tamper, message",
    [
        (
            flip_byte,
            r"checksum mismatch for index.safetensors: manifest sha256 [0-9a-f]{12}\.\.\., "
            r"file sha256 [0-9a-f]{12}\.\.\.; the snapshot is corrupt or was modified",
        ),
        (
            truncate,
            r"size mismatch for index.safetensors: manifest \d+ bytes, file \d+ bytes; "
            "the snapshot is truncated",
        ),
        (
            lambda p: (p / "weights.safetensors").unlink(),
            "missing file weights.safetensors listed in the manifest",
        ),
        (
            lambda p: (p / "manifest.json").write_text('{"format": "sterling-snap'),
            "manifest.json of snapshot .* is not valid JSON",
        ),
        (lambda p: (p / "manifest.json").write_bytes(b"\xff\xfe"), "is not valid JSON"),
        (lambda p: (p / "manifest.json").unlink(), "has no manifest.json"),
        (lambda p: (p / "extra.safetensors").write_bytes(b"x"), "unlisted file extra.safetensors"),
        (
            lambda p: edit_manifest(p, lambda m: m.update(format_version=2)),
            "has format_version 2; this sterling reads version 1",
        ),
        (
            lambda p: edit_manifest(p, lambda m: m.update(format_version="1")),
            "has format_version '1'",
        ),
        (
            lambda p: edit_manifest(p, lambda m: m.update(format="other")),
            "does not declare format 'sterling-snapshot'",
        ),
        (lambda p: edit_manifest(p, lambda m: m.pop("meta")), "needs objects 'meta' and 'files'"),
        (
            lambda p: edit_manifest(
                p,
                lambda m: m["files"].update({"../x.safetensors": m["files"]["index.safetensors"]}),
            ),
            "lists an invalid file name '../x.safetensors'",
        ),
        (
            lambda p: edit_manifest(p, lambda m: m["files"]["index.safetensors"].update(bytes="12")),
            "entry for index.safetensors needs a hex 'sha256' and int 'bytes'",
        ),
        (consistent_garbage, "cannot parse weights.safetensors"),
    ],
)
def test_refuses_tampered_snapshot(tmp_path: Path, tamper, message: str) -> None:
    path = write(tmp_path / "snap")
    tamper(path)
    with pytest.raises(SnapshotError, match=message):
        read_snapshot(path)
    if tamper is not consistent_garbage:  # verification checks checksums, not tensor headers
        with pytest.raises(SnapshotError, match=message):
            verify_snapshot(path)


def test_refuses_a_path_that_is_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(SnapshotError, match="is not a directory"):
        read_snapshot(tmp_path / "nothing")
    assert issubclass(SnapshotError, ValueError)


def test_loading_never_unpickles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path / "snap")

    def forbidden(*args, **kwargs):
        raise AssertionError("a snapshot load used pickle")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    assert_same_tensors(read_snapshot(path).tensors, TENSORS)


# ---- the in-place safetensors reader --------------------------------------------------------------

DTYPES = [
    torch.float64,
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(DTYPES), st.lists(st.integers(0, 5), min_size=0, max_size=3)), min_size=0, max_size=6
    ),
    st.integers(0, 2**31),
)
def test_parse_safetensors_equals_the_library(spec, seed) -> None:
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for i, (dtype, shape) in enumerate(spec):
        values = torch.randint(-100, 100, shape, generator=gen)
        tensors[f"t{i}"] = (values > 0) if dtype == torch.bool else values.to(dtype)
    data = safetensors.torch.save(tensors, metadata={"who": "test"})
    want, got = safetensors.torch.load(data), parse_safetensors(data)
    assert set(got) == set(want)
    for name in want:
        assert got[name].dtype == want[name].dtype and torch.equal(got[name], want[name])


def _file(header: dict, payload: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + payload


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "shorter than"),
        (b"\xff" * 8, "header of"),
        ((5).to_bytes(8, "little") + b"{nope", "not JSON"),
        (_file([1, 2]), "not a JSON object"),
        (_file({"a": {"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4), "bad entry"),
        (_file({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4), r"4 bytes for \[2\]"),
        (_file({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 4), "byte range"),
        (_file({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4), "bad shape"),
        (
            _file(
                {
                    "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                    "b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                },
                b"\0" * 8,
            ),
            "overlap",
        ),
        (_file({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 12), "cover 4 of the 12"),
        (_file({"a": {"dtype": "F32", "shape": [1]}}, b"\0" * 4), "bad entry"),
    ],
)
def test_parse_safetensors_refuses_malformed_files(data, message) -> None:
    with pytest.raises(ValueError, match=message):
        parse_safetensors(data)


def test_an_unaligned_tensor_is_copied_not_viewed() -> None:
    header = {
        "a": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [3, 11]},
    }
    raw = json.dumps(header).encode()
    raw += b" " * (-(8 + len(raw)) % 8)  # the data starts aligned; b starts 3 bytes in
    data = len(raw).to_bytes(8, "little") + raw + bytes([1, 2, 3]) + torch.tensor([1.5, -2.0]).numpy().tobytes()
    out = parse_safetensors(data)
    assert out["a"].tolist() == [1, 2, 3] and out["b"].tolist() == [1.5, -2.0]
