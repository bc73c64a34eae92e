"""Split instruction records into a held-out test set and N client files.

Schemes (all seeded: the same seed gives the same split):
- ``iid``: shuffle, then equal-sized slices.
- ``shards``: the FedIT paper repo's default (client_data_allocation.py): sort by
  category, cut into ``shards_per_client * N`` contiguous shards, shuffle the
  shards, give each client ``shards_per_client`` of them. Clients see 1-2 categories.
- ``dirichlet``: per category, proportions ~ Dir(alpha) over clients, with the
  paper repo's balancing and a minimum client size (resampled until met); the
  non-IID split of the paper's Figure 2.
- ``quantity``: IID content, client sizes ~ Dir(alpha) (quantity skew), each
  client at least ``min_size`` records.

Natural clients (``by``): one client per value of a field of the records (a user id, a
department, a language), in sorted order of the values; a record without the field is
left out, and so is a client with fewer than ``min_size`` records (default 1: none), all
counted in the manifest. Clients are never merged: two users' data in one client is not a
federation that exists. ``label`` makes another field the category of every record, for the
hold-out, the dirichlet and shards schemes, the plot and evaluation's per-category figures.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from fedit.checkpoint import atomic_dir, atomic_write_json
from fedit.data.records import UNCATEGORIZED, LoadResult, Record, write_jsonl
from fedit.errors import FeditError

SCHEMES = ("iid", "shards", "dirichlet", "quantity")


@dataclass(frozen=True)
class Split:
    test: list[int]  # record indices
    clients: list[list[int]]
    names: list[str] | None = None  # natural clients: each client's value of the ``by`` field
    left_out: dict = field(default_factory=dict)  # natural clients: records and clients left out, and why


def holdout(records: list[Record], per_category: int, rng: np.random.Generator) -> tuple[list[int], list[int]]:
    """(test indices, train indices): ``per_category`` random records of every category go to test."""
    by_cat: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        by_cat.setdefault(r.category, []).append(i)
    test: list[int] = []
    for cat in sorted(by_cat):
        idx = by_cat[cat]
        take = min(per_category, len(idx))
        test += sorted(rng.choice(idx, size=take, replace=False).tolist())
    chosen = set(test)
    return test, [i for i in range(len(records)) if i not in chosen]


def _iid(train: list[int], n: int, rng: np.random.Generator) -> list[list[int]]:
    perm = rng.permutation(train)
    return [sorted(p.tolist()) for p in np.array_split(perm, n)]


def _shards(train: list[int], cats: list[str], n: int, per_client: int, rng: np.random.Generator) -> list[list[int]]:
    # Stable sort by category keeps the original order inside a category, as pandas does in the paper repo.
    ordered = np.array(sorted(train, key=lambda i: cats[i]), dtype=np.int64)
    shards = np.array_split(ordered, n * per_client)
    order = rng.permutation(len(shards))
    return [sorted(np.concatenate([shards[j] for j in order[c * per_client:(c + 1) * per_client]]).tolist())
            for c in range(n)]


def _dirichlet(train: list[int], cats: list[str], n: int, alpha: float, min_size: int,
               rng: np.random.Generator, max_attempts: int = 1000) -> list[list[int]]:
    """The paper repo's loop (after Hsu et al. 2019 / NIID-Bench): per category, Dir(alpha) shares
    over clients, clients already above the mean size get no more; resample until every client
    has ``min_size`` records. flwr-datasets' DirichletPartitioner runs the same loop but gives up
    after 10 attempts, which fails at the paper's own setting (100 clients, alpha 0.5, min 40)."""
    by_cat: dict[str, np.ndarray] = {}
    for i in train:
        by_cat.setdefault(cats[i], []).append(i)
    mean = len(train) / n
    for _ in range(max_attempts):
        parts: list[list[int]] = [[] for _ in range(n)]
        for cat in sorted(by_cat):
            idx = rng.permutation(by_cat[cat])
            p = rng.dirichlet(np.full(n, alpha))
            p = p * np.array([len(part) < mean for part in parts])
            p = p / p.sum()
            cuts = (np.cumsum(p) * len(idx)).astype(int)[:-1]
            for part, chunk in zip(parts, np.split(idx, cuts)):
                part.extend(chunk.tolist())
        if min(len(part) for part in parts) >= min_size:
            return [sorted(part) for part in parts]
    raise FeditError(f"dirichlet split of {len(train)} records over {n} clients did not give every client "
                     f"{min_size} records in {max_attempts} attempts; lower --min-size, use fewer --clients "
                     f"or a larger --alpha")


def _quantity(train: list[int], n: int, alpha: float, min_size: int, rng: np.random.Generator) -> list[list[int]]:
    spare = len(train) - n * min_size
    if spare < 0:
        raise FeditError(f"quantity split: {len(train)} records cannot give {n} clients {min_size} each; "
                         f"lower --min-size or use fewer --clients")
    props = rng.dirichlet(np.full(n, alpha))
    sizes = min_size + np.floor(props * spare).astype(int)
    sizes[: spare - (sizes.sum() - n * min_size)] += 1  # hand out the rounding remainder
    perm = rng.permutation(train)
    return [sorted(p.tolist()) for p in np.split(perm, np.cumsum(sizes)[:-1])]


def _natural(records: list[Record], train: list[int], by: str, min_size: int) -> Split:
    groups: dict[str, list[int]] = {}
    missing = 0
    for i in train:
        value = records[i].field(by)
        if value is None:
            missing += 1
        else:
            groups.setdefault(value, []).append(i)
    small = {v: idx for v, idx in groups.items() if len(idx) < min_size}
    kept = sorted(v for v in groups if v not in small)
    if not kept:
        raise FeditError(f"no client left: {len(groups)} values of {by!r}, none with {min_size} records "
                         f"({missing} records without the field); lower --min-size or choose another --by field")
    left_out = {"records_without_field": missing, "clients_below_min_size": len(small),
                "records_of_those_clients": sum(map(len, small.values()))}
    return Split(test=[], clients=[groups[v] for v in kept], names=kept, left_out=left_out)


def split(records: list[Record], clients: int, scheme: str = "dirichlet", *, alpha: float = 0.5,
          seed: int = 42, test_per_category: int = 10, min_size: int | None = None,
          shards_per_client: int = 2, by: str = "") -> Split:
    """The held-out test set and each client's records; ``by``: natural clients (``clients``
    and ``scheme`` are then not used)."""
    if by:
        test, train = holdout(records, test_per_category, np.random.default_rng(seed))
        return replace(_natural(records, train, by, min_size or 1), test=test)
    if scheme not in SCHEMES:
        raise FeditError(f"unknown scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    if clients < 1:
        raise FeditError(f"--clients must be at least 1, got {clients}")
    if alpha <= 0:
        raise FeditError(f"--alpha must be > 0, got {alpha}")
    rng = np.random.default_rng(seed)
    test, train = holdout(records, test_per_category, rng)
    if len(train) < clients:
        raise FeditError(f"{len(train)} training records cannot fill {clients} clients; use fewer --clients")
    if min_size is None:
        # The paper repo asks 40 records of every client; shrink it when clients are many and small.
        min_size = min(40, len(train) // clients // 2)
    cats = [r.category for r in records]
    if scheme == "iid":
        parts = _iid(train, clients, rng)
    elif scheme == "shards":
        if len(train) < clients * shards_per_client:
            raise FeditError(f"{len(train)} records cannot make {clients * shards_per_client} shards; use fewer --clients")
        parts = _shards(train, cats, clients, shards_per_client, rng)
    elif scheme == "dirichlet":
        parts = _dirichlet(train, cats, clients, alpha, min_size, rng)
    else:
        parts = _quantity(train, clients, alpha, min_size, rng)
    return Split(test=test, clients=parts)


VALIDATION_STREAM = 0x76616C  # "val": keeps the validation draw apart from every other use of the seed


def validation_size(records: int, amount) -> int:
    """Records a client of ``records`` holds back for validation under data.client_validation: a fraction
    rounded up or a count, always leaving one record to train on (a client of one record keeps it)."""
    from fedit.fields import amount_of

    return 0 if not amount or records < 2 else min(records - 1, amount_of(amount, records))


def split_validation(n: int, amount, seed: int, client_id: int) -> tuple[list[int], list[int]]:
    """(training indices, validation indices) of a client's ``n`` records, in file order. Drawn from
    (seed, client id) alone, so the simulation, a Flower SuperNode and a resumed run hold back the same
    records of the same file."""
    k = validation_size(n, amount)
    held = set(np.random.default_rng([seed, client_id, VALIDATION_STREAM]).permutation(n)[:k].tolist())
    return [i for i in range(n) if i not in held], sorted(held)


def client_file(i: int, n: int) -> str:
    return f"client_{i:0{max(3, len(str(n - 1)))}d}.jsonl"


def write(out: str | Path, loaded: LoadResult, sp: Split, *, scheme: str, seed: int, alpha: float,
          test_per_category: int, by: str = "", label: str = "category", validation=0) -> dict:
    """Write client files, test.jsonl, manifest.json and heterogeneity.png into ``out`` atomically;
    with ``validation`` (data.client_validation) the manifest counts each client's training and
    validation records (the split itself is drawn when the client reads its file)."""
    records = loaded.records
    n = len(sp.clients)
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / "manifest.json").exists():
        raise FeditError(f"{out} exists and is not a fedit partition directory; choose another --out")
    categories = sorted({r.category for r in records})
    manifest = {
        "source": loaded.source, "scheme": scheme, "seed": seed, "alpha": alpha if scheme in ("dirichlet", "quantity") else None,
        "test_per_category": test_per_category, "records": len(records), "label": label,
        **({"client_validation": validation, "validation_seed": seed} if validation else {}),
        **({"by": by, "left_out": sp.left_out} if by else {}),
        "skipped": [{"line": line, "reason": why} for line, why in loaded.skipped],
        "categories": categories,
        "test": {"file": "test.jsonl", "examples": len(sp.test),
                 "categories": dict(Counter(records[i].category for i in sp.test))},
        "clients": [],
    }
    with atomic_dir(out) as tmp:
        write_jsonl(tmp / "test.jsonl", (records[i] for i in sp.test))
        for c, idx in enumerate(sp.clients):
            name = client_file(c, n)
            write_jsonl(tmp / name, (records[i] for i in idx))
            held = validation_size(len(idx), validation)
            manifest["clients"].append({"id": c, "file": name, "examples": len(idx),
                                        **({"train": len(idx) - held, "validation": held} if validation else {}),
                                        # under its own key: a field named "id" or "file" must not replace those
                                        **({"value": sp.names[c]} if by else {}),
                                        "categories": dict(Counter(records[i].category for i in idx))})
        atomic_write_json(tmp / "manifest.json", manifest)
        plot_heterogeneity(manifest, tmp / "heterogeneity.png")
    return manifest


def make(source: str, out: str | Path, *, clients: int = 100, scheme: str = "dirichlet", alpha: float = 0.5,
         min_size: int | None = None, test_per_category: int = 10, seed: int = 42, fields: str = "",
         split_name: str = "train", by: str = "", label: str = "category", sample: int = 0,
         validation=0) -> tuple[dict, LoadResult]:
    """Read ``source`` (a file or hub id), split it and write the partition into ``out``:
    `fedit partition` and `fedit run data.source=...` both come here. ``min_size`` 0 or None: the default.
    ``sample`` > 0: only that many records, drawn with ``seed``, in their original order (experiments)."""
    import random

    from fedit.data.records import load_records, parse_mapping

    label = label or "category"
    keep = tuple(f for f in (by, label) if f and f != "category")
    loaded = load_records(source, parse_mapping(fields), split=split_name, keep=keep)
    if 0 < sample < len(loaded.records):
        loaded.records = [loaded.records[i] for i in sorted(random.Random(seed).sample(range(len(loaded.records)),
                                                                                         sample))]
    if label != "category":
        loaded.records = [replace(r, category=r.field(label) or UNCATEGORIZED) for r in loaded.records]
    sp = split(loaded.records, clients, scheme, alpha=alpha, seed=seed, test_per_category=test_per_category,
               min_size=min_size or None, by=by)
    return write(out, loaded, sp, scheme="by " + by if by else scheme, seed=seed, alpha=alpha,
                 test_per_category=test_per_category, by=by, label=label, validation=validation), loaded


def describe(m: dict, loaded: LoadResult) -> list[str]:
    """What a partition holds, in a few lines for the console."""
    sizes = [c["examples"] for c in m["clients"]]
    kind = "conversations" if any(r.is_conversation for r in loaded.records) else "records"
    label = "category" if m.get("label", "category") == "category" else f"category (field {m['label']!r})"
    lines = [f"read {m['records']} {kind} from {m['source']}; {loaded.skipped_summary()}",
             f"test: {m['test']['examples']} records ({m['test_per_category']} per {label}, "
             f"{len(m['categories'])} categories)" if m["test"]["examples"] else
             "test: none held out (the server holds no data; set data.client_validation to measure the run)",
             f"{m['scheme']} split over {len(sizes)} clients: {sum(sizes)} records, {min(sizes)}-{max(sizes)} per client"]
    if m.get("client_validation"):
        lines.append(validation_line(m["client_validation"], [c["examples"] for c in m["clients"]]))
    if m.get("left_out"):
        lo = m["left_out"]
        lines.append(f"left out: {lo['records_without_field']} records without {m['by']!r}, "
                     f"{lo['clients_below_min_size']} clients below the minimum size "
                     f"({lo['records_of_those_clients']} records)")
    return lines


def validation_line(amount, sizes: list[int]) -> str:
    held = [validation_size(n, amount) for n in sizes]
    share = f"{amount:.0%}" if isinstance(amount, float) else f"{amount} record(s)"
    none = sum(1 for h in held if h == 0)
    return (f"validation: {share} of each client's records held back on the client: {sum(held)} records, "
            f"{min(held)}-{max(held)} per client" + (f"; {none} client(s) too small to spare one train on all "
                                                     f"their records" if none else ""))


def plot_heterogeneity(manifest: dict, path: Path) -> None:
    """Stacked bars of categories per client, like the paper's Figure 2."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cats = manifest["categories"]
    clients = manifest["clients"]
    counts = np.array([[c["categories"].get(cat, 0) for cat in cats] for c in clients])
    fig, ax = plt.subplots(figsize=(max(6.0, min(24.0, 0.12 * len(clients) + 4)), 4.5))
    bottom = np.zeros(len(clients))
    colors = plt.get_cmap("tab10" if len(cats) <= 10 else "tab20")
    for k, cat in enumerate(cats):
        ax.bar(np.arange(len(clients)), counts[:, k], bottom=bottom, width=0.85, color=colors(k % colors.N),
               label=cat.replace("_", " "))
        bottom += counts[:, k]
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # client ids are whole numbers: no 2.5 on the axis
    ax.set_xlabel("client")
    ax.set_ylabel("examples")
    alpha = f", alpha={manifest['alpha']}" if manifest.get("alpha") else ""
    ax.set_title(f"{manifest['scheme']} split of {int(counts.sum())} records over {len(clients)} clients{alpha}")
    ax.set_xlim(-0.6, len(clients) - 0.4)
    ax.set_ylim(0, counts.sum(axis=1).max() * 1.05)  # headroom: the tallest client is not cut by the frame
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fingerprint(files: list[Path]) -> str:
    """sha256 over the names and bytes of the files that exist: a resumed run checks it still
    trains on the data it started with."""
    import hashlib

    h = hashlib.sha256()
    for f in files:
        if f.is_file():
            h.update(f.name.encode() + b"\0")
            with open(f, "rb") as fh:
                while chunk := fh.read(1 << 20):
                    h.update(chunk)
    return h.hexdigest()


def partition_sha256(clients_dir: str | Path, test_file: str | Path | None = None, test: bool = True) -> str:
    """The fingerprint of a partition as a run sees it: the test file and every client file, by name
    and bytes (``test`` false: a server that holds no test set never opens it). Not the manifest's own
    bytes: a field a newer fedit adds to it (as "label" was) must not make runs trained on the same
    files look as if they had other data."""
    d = Path(clients_dir)
    files = [d / c["file"] for c in read_manifest(d)["clients"]]
    return fingerprint([Path(test_file or d / "test.jsonl")] * test + files)


def read_manifest(clients_dir: str | Path) -> dict:
    import json

    path = Path(clients_dir) / "manifest.json"
    if not path.is_file():
        raise FeditError(f"{clients_dir} has no manifest.json; set data.clients_dir to a directory made by "
                         f"`fedit partition --out DIR`")
    return json.loads(path.read_text())
