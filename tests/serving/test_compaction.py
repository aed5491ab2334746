"""Compaction: a snapshot plus its pending updates always equals the reference (every acknowledged
update applied in order to the first snapshot), whatever mix of updates, compactions, restarts on
the first snapshot, reopened logs and compactions cut off before the log was folded came before."""

import random
import shutil
from pathlib import Path

import pytest
import torch

from sterling.cli import main
from sterling.retrieval.publish import load_model
from sterling.serving.compaction import compact, compacted_path, default_log_path, pending_updates, position_of
from sterling.serving.update_log import Update, UpdateLog
from sterling.snapshot import SnapshotError
from sterling.testing.snapshots import build_serving_snapshot

DIM = 64
NEW = 10**9  # ids of items the snapshot does not hold


@pytest.fixture(scope="module")
def first(tmp_path_factory) -> Path:
    return build_serving_snapshot(tmp_path_factory.mktemp("compaction") / "first", num_items=300, seed=1, k0=50)


def random_update(rng: random.Random, catalogue: list[int]) -> Update:
    pool = catalogue[:10] + list(range(NEW, NEW + 12))  # catalogue items and new ones, often repeated
    ids = rng.sample(pool, rng.randint(0, 3))
    deletes = rng.sample(pool, rng.randint(0, 2))
    attributes = [{"creator": rng.randint(1, 50)} for _ in ids]
    return Update(ids, torch.nn.functional.normalize(torch.randn(len(ids), DIM), dim=1), attributes, deletes)


def served(snapshot: Path, log: UpdateLog):
    """What a server started on ``snapshot`` with ``log`` serves."""
    model = load_model(snapshot)
    pending = pending_updates(snapshot, log)
    if pending:
        Update.merged(pending).apply(model)
    return model


def assert_same_items(model, reference) -> None:
    ids = sorted(reference.index.ids.tolist())
    assert sorted(model.index.ids.tolist()) == ids
    assert model.index.attributes_of(ids) == reference.index.attributes_of(ids)
    torch.testing.assert_close(model.index.embeddings_of(ids), reference.index.embeddings_of(ids), rtol=0, atol=0.02)


@pytest.mark.parametrize("seed", range(4))
def test_a_snapshot_and_its_pending_updates_equal_every_update_applied_in_order(first, tmp_path, seed):
    rng = random.Random(seed)
    root = tmp_path / "root"
    root.mkdir()
    reference = load_model(first)
    catalogue = reference.index.ids.tolist()
    log_path = tmp_path / "first.updates.sqlite"
    log, current, compactions = UpdateLog(log_path), first, 0
    try:
        for _ in range(24):
            op = rng.choices(["update", "compact", "cut off", "restart", "reopen"], [10, 3, 1, 1, 1])[0]
            if op == "update":
                update = random_update(rng, catalogue)
                log.append(update)
                update.apply(reference)
            elif op == "compact":
                current = compact(current, log, compacted_path(root, log.last_seq), loader=load_model)
                compactions += 1
                assert load_model(current).size().fresh_items == 0  # the fresh items are in their IVF lists
                assert position_of(current).seq == log.last_seq and log.entries() == []
            elif op == "cut off":  # the compacted snapshot written, the process killed before the log's fold

                class Killed(Exception):
                    pass

                def killed(*_):
                    raise Killed

                fold, log.fold = log.fold, killed
                with pytest.raises(Killed):
                    compact(current, log, compacted_path(root, log.last_seq), loader=load_model)
                log.fold = fold
            elif op == "restart":  # a server started again on the snapshot it was first started on
                current = first
            else:
                log.close()
                log = UpdateLog(log_path)
            assert_same_items(served(current, log), reference)
    finally:
        log.close()


def test_a_compacted_snapshot_records_its_log_position_and_is_never_overwritten(first, tmp_path):
    log = UpdateLog(tmp_path / "log.sqlite")
    try:
        log.append(Update([NEW], torch.ones(1, DIM) / 8, [{"creator": 3}], []))
        out = compact(first, log, compacted_path(tmp_path, log.last_seq))
        assert out.name == "compacted-1" and position_of(out).log_id == log.id and position_of(first) is None
        assert default_log_path(out) == log.path.resolve()  # served again with the log it was compacted from
        assert default_log_path(first) == first.parent / "first.updates.sqlite"
        assert compacted_path(tmp_path, 1).name == "compacted-1.1"
        with pytest.raises(ValueError, match="new path"):
            compact(out, log, out)
    finally:
        log.close()


def test_another_logs_compacted_snapshot_is_served_with_this_logs_updates(first, tmp_path):
    mine, theirs = UpdateLog(tmp_path / "mine.sqlite"), UpdateLog(tmp_path / "theirs.sqlite")
    try:
        theirs.append(Update([NEW + 1], torch.ones(1, DIM) / 8, [{"creator": 4}], []))
        other = compact(first, theirs, tmp_path / "theirs-compacted")
        mine.append(Update([NEW + 2], torch.ones(1, DIM) / 8, [{"creator": 5}], []))
        ids = set(served(other, mine).index.ids.tolist())
        assert {NEW + 1, NEW + 2} <= ids  # its own items, and every entry of a log it does not hold
    finally:
        mine.close()
        theirs.close()


def test_a_log_whose_base_snapshot_is_gone_is_one_clear_error(first, tmp_path):
    log = UpdateLog(tmp_path / "log.sqlite")
    try:
        log.append(Update([NEW], torch.ones(1, DIM) / 8, [{"creator": 3}], []))
        out = compact(first, log, tmp_path / "compacted")
        shutil.rmtree(out)
        with pytest.raises(SnapshotError, match="was compacted into"):
            pending_updates(first, log)
    finally:
        log.close()


def test_sterling_snapshot_compact_folds_a_stopped_servers_log(first, tmp_path, capsys):
    snapshot = tmp_path / "snap"
    shutil.copytree(first, snapshot)
    assert main(["snapshot", "compact", "--snapshot", str(snapshot)]) != 0
    assert "no update log" in capsys.readouterr().err
    reference = load_model(snapshot)
    log = UpdateLog(default_log_path(snapshot))
    for i in range(3):
        update = Update([NEW + i], torch.ones(1, DIM) / (i + 2), [{"creator": i}], [reference.index.ids[i].item()])
        log.append(update)
        update.apply(reference)
    log.close()
    assert main(["snapshot", "compact", "--snapshot", str(snapshot), "--out", str(tmp_path / "out")]) == 0
    assert "through seq 3" in capsys.readouterr().out
    log = UpdateLog(default_log_path(snapshot))
    try:
        assert log.entries() == [] and log.base == (tmp_path / "out", 3)
        assert_same_items(served(tmp_path / "out", log), reference)
        assert_same_items(served(snapshot, log), reference)  # started again on the old one: the base carries them
    finally:
        log.close()
