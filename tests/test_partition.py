import json
from collections import Counter

import numpy as np
import pytest

from fedit.data import partition
from fedit.data.records import Record, load_records
from fedit.errors import FeditError


def recs(counts: dict[str, int]) -> list[Record]:
    return [Record(f"{c} {i}", "", "r", c) for c, n in counts.items() for i in range(n)]


def check_disjoint_cover(sp, n_records):
    flat = sp.test + [i for c in sp.clients for i in c]
    assert sorted(flat) == list(range(n_records))


def test_holdout_takes_n_per_category():
    records = recs({"a": 5, "b": 3, "c": 20})
    test, train = partition.holdout(records, 4, np.random.default_rng(0))
    assert Counter(records[i].category for i in test) == {"a": 4, "b": 3, "c": 4}
    assert len(train) == 28 - 11


def test_iid_sizes_differ_by_at_most_one():
    records = recs({"a": 50, "b": 51})
    sp = partition.split(records, 7, "iid", test_per_category=1)
    check_disjoint_cover(sp, 101)
    # 101 records - 2 held out = 99 = 6 * 14 + 15
    assert sorted(len(c) for c in sp.clients) == [14] * 6 + [15]


def test_shards_hand_computed():
    # 12 train records sorted by category a(4) b(4) c(4); 2 clients x 3 shards = 6 shards of 2.
    records = recs({"a": 4, "b": 4, "c": 4})
    train = list(range(12))
    parts = partition._shards(train, [r.category for r in records], 2, 3, np.random.default_rng(3))
    order = np.random.default_rng(3).permutation(6)
    shards = [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11]]
    expected = [sorted(sum((shards[j] for j in order[:3]), [])), sorted(sum((shards[j] for j in order[3:]), []))]
    assert parts == expected
    # every shard lies inside one category: a client sees at most 3 categories here, 2 with the default
    for p in parts:
        assert len({records[i].category for i in p}) <= 3


def test_shards_default_gives_each_client_two_category_runs():
    records = recs({c: 40 for c in "abcdefgh"})
    sp = partition.split(records, 8, "shards", test_per_category=0)
    check_disjoint_cover(sp, 320)
    assert all(len(c) == 40 for c in sp.clients)
    assert all(len({records[i].category for i in c}) <= 2 for c in sp.clients)


def test_dirichlet_respects_min_size_and_seed():
    records = recs({c: 100 for c in "abcdefgh"})
    a = partition.split(records, 10, "dirichlet", alpha=0.5, seed=1, test_per_category=2, min_size=20)
    b = partition.split(records, 10, "dirichlet", alpha=0.5, seed=1, test_per_category=2, min_size=20)
    c = partition.split(records, 10, "dirichlet", alpha=0.5, seed=2, test_per_category=2, min_size=20)
    check_disjoint_cover(a, 800)
    assert a == b and a != c
    assert min(len(p) for p in a.clients) >= 20


def test_dirichlet_alpha_controls_heterogeneity():
    records = recs({c: 200 for c in "abcdefgh"})

    def mean_categories(alpha):
        sp = partition.split(records, 10, "dirichlet", alpha=alpha, seed=0, test_per_category=0, min_size=5)
        # effective number of categories per client (inverse Simpson index)
        eff = []
        for p in sp.clients:
            share = np.array(list(Counter(records[i].category for i in p).values())) / len(p)
            eff.append(1 / (share ** 2).sum())
        return np.mean(eff)

    assert mean_categories(0.1) < 3.0 < 7.0 < mean_categories(100.0)


def test_dirichlet_impossible_min_size_is_clear():
    with pytest.raises(FeditError, match="lower --min-size"):
        partition.split(recs({"a": 30}), 10, "dirichlet", test_per_category=0, min_size=10)


def test_quantity_skew():
    records = recs({"a": 300, "b": 300})
    sp = partition.split(records, 6, "quantity", alpha=0.3, seed=5, test_per_category=0, min_size=10)
    check_disjoint_cover(sp, 600)
    sizes = [len(c) for c in sp.clients]
    assert min(sizes) >= 10 and sum(sizes) == 600 and max(sizes) > 2 * min(sizes)


def test_write_makes_files_manifest_and_plot(tmp_path, records_file):
    loaded = load_records(records_file)
    sp = partition.split(loaded.records, 4, "dirichlet", alpha=1.0, seed=0, test_per_category=2, min_size=3)
    m = partition.write(tmp_path / "out", loaded, sp, scheme="dirichlet", seed=0, alpha=1.0, test_per_category=2)
    out = tmp_path / "out"
    assert json.loads((out / "manifest.json").read_text()) == m
    for c in m["clients"]:
        lines = (out / c["file"]).read_text().splitlines()
        assert len(lines) == c["examples"] == sum(c["categories"].values())
    assert m["test"]["examples"] == 8 and len((out / "test.jsonl").read_text().splitlines()) == 8
    assert (out / "heterogeneity.png").read_bytes()[:4] == b"\x89PNG"


def test_partition_fingerprint_follows_the_data_not_the_manifests_format(tmp_path, records_file):
    loaded = load_records(records_file)
    sp = partition.split(loaded.records, 3, "iid", seed=0, test_per_category=2)
    out = tmp_path / "out"
    partition.write(out, loaded, sp, scheme="iid", seed=0, alpha=0.5, test_per_category=2)
    before = partition.partition_sha256(out)
    m = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**m, "a_field_a_newer_version_adds": 1}, indent=2))
    assert partition.partition_sha256(out) == before  # runs on these files stay reusable
    with open(out / m["clients"][1]["file"], "a") as f:
        f.write(json.dumps({"instruction": "new", "response": "row", "category": "open_qa"}) + "\n")
    assert partition.partition_sha256(out) != before


def test_heterogeneity_plot_labels_clients_with_whole_numbers(tmp_path, monkeypatch):
    import matplotlib.figure

    from fedit.data import partition

    seen = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: seen.append(fig))
    manifest = {"categories": ["a", "b"], "scheme": "iid", "alpha": None,
                "clients": [{"categories": {"a": i, "b": 1}} for i in range(5)]}
    partition.plot_heterogeneity(manifest, tmp_path / "h.png")
    ticks = [t for t in seen[0].axes[0].get_xticks() if -0.6 <= t <= 4.6]
    assert ticks and all(float(t).is_integer() for t in ticks), ticks


def test_make_can_draw_a_seeded_sample_of_the_records_first(tmp_path, records_file):
    m1, loaded = partition.make(str(records_file), tmp_path / "a", clients=2, scheme="iid", test_per_category=1,
                                seed=3, sample=20)
    m2, _ = partition.make(str(records_file), tmp_path / "b", clients=2, scheme="iid", test_per_category=1,
                           seed=3, sample=20)
    every = load_records(records_file).records
    assert m1["records"] == len(loaded.records) == 20 < len(every)
    positions = [every.index(r) for r in loaded.records]
    assert positions == sorted(positions)  # the original order, a subset of it
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
               for f in ("client_000.jsonl", "client_001.jsonl", "test.jsonl"))
