import numpy as np
import pyarrow.parquet as pq
import pytest

from sterling.data.batch import ItemCatalog, RequestReader, encode_categorical
from sterling.data.items import read_items
from sterling.data.synth import SynthConfig, generate


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return generate(SynthConfig(num_users=40, num_items=300, seed=3), tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def catalog(tiny):
    ids, _, _ = read_items(tiny / "items.parquet")
    return ItemCatalog(ids)


def timelines(tiny):
    users = pq.read_table(tiny / "users.parquet").to_pylist()
    return {u["user_id"]: list(zip(u["timeline_item_id"], u["timeline_action"], u["timeline_ts"])) for u in users}


@pytest.mark.parametrize("max_history,budget", [(5, 64), (50, 2000), (1000, 100000)])
def test_batches_carry_each_request_once_with_its_exact_history(tiny, catalog, max_history, budget):
    requests = pq.read_table(tiny / "requests.parquet").to_pylist()
    tl = timelines(tiny)
    reader = RequestReader(tiny, catalog, max_history=max_history, token_budget=budget)
    seen = []
    for batch in reader.batches(read_rows=37):
        h_len = (batch.history_offsets[1:] - batch.history_offsets[:-1]).numpy()
        k = (batch.impression_offsets[1:] - batch.impression_offsets[:-1]).numpy()
        assert batch.num_requests == 1 or (h_len + k).sum() <= budget
        for r in range(batch.num_requests):
            req = requests[len(seen)]
            assert batch.request_ids[r] == req["request_id"]
            expected = [e for e in tl[req["user_id"]] if e[2] < req["ts"]][-max_history:]
            lo, hi = batch.history_offsets[r], batch.history_offsets[r + 1]
            assert catalog.item_ids[batch.history_items[lo:hi].numpy()].tolist() == [e[0] for e in expected]
            assert batch.history_actions[lo:hi].tolist() == [e[1] for e in expected]
            assert batch.history_ts[lo:hi].tolist() == [e[2] for e in expected]
            assert (batch.history_ts[lo:hi] < req["ts"]).all()
            lo, hi = batch.impression_offsets[r], batch.impression_offsets[r + 1]
            imps = req["impressions"]
            assert catalog.item_ids[batch.item_rows[lo:hi].numpy()].tolist() == [i["item_id"] for i in imps]
            for t, name in enumerate(reader.roles.labels):
                assert batch.labels[lo:hi, t].tolist() == [float(i[name]) for i in imps]
            seen.append(req["request_id"])
        assert (batch.impression_to_request().bincount(minlength=batch.num_requests).numpy() == k).all()
    assert seen == [r["request_id"] for r in requests]


def test_exclude_and_only(tiny, catalog):
    ids = pq.read_table(tiny / "requests.parquet", columns=["request_id"]).column("request_id").to_numpy()
    some = ids[::3]
    reader = RequestReader(tiny, catalog, token_budget=500)
    kept = np.concatenate([b.request_ids.numpy() for b in reader.batches(only=some)])
    rest = np.concatenate([b.request_ids.numpy() for b in reader.batches(exclude=some)])
    assert kept.tolist() == some.tolist()
    assert sorted(np.concatenate([kept, rest]).tolist()) == sorted(ids.tolist())


def test_unknown_item_is_an_error():
    catalog = ItemCatalog(np.array([5, 3, 9]))
    assert catalog.rows(np.array([9, 5])).tolist() == [2, 0]
    with pytest.raises(ValueError, match="not in the item catalog"):
        catalog.rows(np.array([4]))
    with pytest.raises(ValueError, match="not unique"):
        ItemCatalog(np.array([1, 1]))


def test_encode_categorical_is_stable():
    import pyarrow as pa

    a = encode_categorical(pa.array(["home", "search", None, "home"]))
    assert a[0] == a[3] and a[0] != a[1] and a[2] == 0 and (a >= 0).all()
    assert encode_categorical(pa.array([3, -4, None], pa.int8())).tolist() == [3, 4, 0]
