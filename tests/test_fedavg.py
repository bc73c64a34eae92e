import torch

from fedit.client import Update
from fedit.strategies import STRATEGIES, get
from fedit.strategies.fedavg import FedAvg


def upd(cid, n, **tensors):
    return Update(client_id=cid, adapter={k: torch.tensor(v, dtype=torch.float32) for k, v in tensors.items()},
                  num_examples=n)


def test_weights_are_example_counts_hand_computed():
    g = {"a": torch.zeros(2), "b": torch.zeros(1)}
    ups = [upd(0, 1, a=[1.0, 2.0], b=[3.0]), upd(1, 3, a=[5.0, 6.0], b=[-1.0])]
    new, used = FedAvg().aggregate(g, iter(ups))
    # a = (1*[1,2] + 3*[5,6]) / 4 = [4, 5];  b = (1*3 + 3*-1) / 4 = 0
    assert used == 2
    assert torch.equal(new["a"], torch.tensor([4.0, 5.0])) and torch.equal(new["b"], torch.tensor([0.0]))


def test_identical_clients_aggregate_to_themselves_exactly():
    torch.manual_seed(0)
    w = {"x": torch.randn(64, 8), "y": torch.randn(8, 64)}
    ups = [Update(i, {k: v.clone() for k, v in w.items()}, n) for i, n in enumerate([7, 130, 1, 999])]
    new, _ = FedAvg().aggregate({k: torch.zeros_like(v) for k, v in w.items()}, ups)
    assert all(torch.equal(new[k], w[k]) for k in w)


def test_no_updates_keeps_the_global_adapter():
    g = {"a": torch.ones(3)}
    new, used = FedAvg().aggregate(g, [])
    assert used == 0 and new is g


def test_streams_one_update_at_a_time():
    made = []

    def gen():
        for i in range(5):
            u = upd(i, 1, a=[float(i)])
            made.append(i)
            yield u

    new, used = FedAvg().aggregate({"a": torch.zeros(1)}, gen())
    assert made == [0, 1, 2, 3, 4] and used == 5 and new["a"].item() == 2.0


def test_registry():
    assert isinstance(get("fedavg"), FedAvg) and "fedavg" in STRATEGIES


def test_selection_is_seeded_by_round_and_distinct():
    s = FedAvg()
    ids = list(range(100))
    a = s.configure_round(3, ids, 5, seed=1)
    assert a == s.configure_round(3, ids, 5, seed=1)
    assert a != s.configure_round(4, ids, 5, seed=1)
    assert len(set(a)) == 5 and set(a) <= set(ids)
