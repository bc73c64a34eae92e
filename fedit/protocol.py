"""What crosses between the server and a client, and the two interfaces an algorithm fills in.

The wire-level types (``FitIns`` down, ``Update`` up, ``Failure`` for a client
that sent nothing usable, ``Summed`` for the round's changes added up by secure
aggregation) are the only things a runtime carries: the
in-process simulation passes them as objects, the Flower runtime converts them
to and from records (runtime/flower.py). Arrays travel as named groups of
tensors, so an algorithm can send more than the global adapter (SCAFFOLD's
control variate down, its change up) without a new message shape.

A client's free-form ``metrics`` live apart from every field the server relies
on (client id, example count, arrays): a metric may be called ``round`` or
``num_examples`` and nothing collides.

``ClientAlgorithm`` is the hook an algorithm gets inside the one client loop
(fedit/client.py): the local optimizer, an extra loss term, a gradient hook
before each optimizer step, metrics of its own, arrays to send beside the
adapter, and state the client keeps between the rounds it takes part in.
``EvalIns`` and ``Evaluation`` carry federated evaluation: the global adapter
down, one client's validation loss sums per category up. The strategy side (selection, instructions,
aggregation, state) is ``fedit.strategies.base.Strategy``.

This module imports no training code, so config validation and the Flower
runtime can use it without loading a model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Union

if TYPE_CHECKING:
    import torch

Arrays = dict[str, "torch.Tensor"]
Scalar = Union[int, float, str, bool]

# Array groups every algorithm uses.
GLOBAL = "global"  # FitIns: the global adapter the client starts from
ADAPTER = "adapter"  # Update: the client's adapter after local training

# FitIns.config key: the last round in which the server accepted this client's update (0: never).
# The client resumes its own state from that round, so state from a round the server did not
# keep (a crash, a rejected update) is never used.
STATE_ROUND = "state_round"
# FitIns.config key under client-level DP with secure aggregation: the L2 bound the client clips its
# own change to (the server never sees a single change to clip).
CLIP = "clip"


@dataclass(frozen=True)
class FitIns:
    """Server -> one selected client, for one round."""

    round: int
    client_id: int
    arrays: dict[str, Arrays]  # GLOBAL always; e.g. "control" for SCAFFOLD
    config: dict[str, Scalar] = field(default_factory=dict)  # small scalars: STATE_ROUND, proximal_mu, ...

    @property
    def global_adapter(self) -> Arrays:
        return self.arrays[GLOBAL]


@dataclass
class Update:
    """One client -> server: named array groups, the examples it trained on this round, its metrics."""

    client_id: int
    arrays: dict[str, Arrays]  # ADAPTER always; e.g. "control_delta" for SCAFFOLD
    num_examples: int  # examples actually trained this round (a client capped by max_steps counts fewer)
    metrics: dict[str, float] = field(default_factory=dict)  # free-form; logged under their own key

    @property
    def adapter(self) -> Arrays:
        return self.arrays[ADAPTER]


@dataclass
class Summed:
    """The round's client changes as secure aggregation delivers them: their sum, never one of them.

    Each contributing client sent Δ_k = θ_k − θ (its adapter minus the global adapter it was sent)
    with weight 1, so the server can form the unweighted mean Σ Δ_k / n and nothing finer. Under
    client-level DP each Δ_k was clipped on the client to the round's bound (FitIns.config[CLIP])
    and ``unclipped`` is Σ_k [‖Δ_k‖ ≤ bound], summed with the changes. ``metrics`` are what each
    client reported in the clear beside its masked vector (timings, not its loss or example count):
    logged, never used."""

    clients: list[int]  # whose changes are in the sum
    arrays: dict[str, Arrays]  # group (ADAPTER) -> Σ_k Δ_k, float64
    unclipped: float | None = None
    metrics: dict[int, dict] = field(default_factory=dict)

    @property
    def adapter(self) -> Arrays:
        return self.arrays[ADAPTER]


@dataclass(frozen=True)
class EvalIns:
    """Server -> one client: score the global adapter on your validation split (no training)."""

    round: int
    client_id: int
    arrays: dict[str, Arrays]  # GLOBAL: the global adapter at the server's rank
    config: dict[str, Scalar] = field(default_factory=dict)

    @property
    def global_adapter(self) -> Arrays:
        return self.arrays[GLOBAL]


@dataclass
class Evaluation:
    """One client -> server: its validation split's loss sums and counts, per category, and nothing else.

    ``by_category[c] = [loss summed over the labelled tokens, labelled tokens, examples]``; the server
    forms token-weighted means from the sums, so clients of unequal sizes combine exactly."""

    client_id: int
    by_category: dict[str, list]
    examples: int  # the client's validation examples (all of them are scored)

    @property
    def loss_sum(self) -> float:
        return sum(v[0] for v in self.by_category.values())

    @property
    def tokens(self) -> int:
        return sum(v[1] for v in self.by_category.values())


@dataclass
class Failure:
    """A selected client that sent no usable reply (crashed, timed out, unreachable), and why."""

    client_id: int
    reason: str


def nbytes(groups: dict[str, Arrays]) -> int:
    """Bytes of the tensors in named array groups: what a message carries, headers aside."""
    return sum(t.numel() * t.element_size() for arrays in groups.values() for t in arrays.values())


class ClientAlgorithm:
    """Hooks inside the client loop; the base class is plain local training (FedAvg's client).

    One instance per client and round, made by the strategy class from the round's FitIns and
    the client's own saved state (None the first time it takes part).
    """

    stateful: ClassVar[bool] = False  # keeps state between the rounds a client takes part in

    def __init__(self, ins: FitIns, state: Arrays | None):
        self.ins, self.state = ins, state

    def extra_loss(self, params: dict[str, "torch.Tensor"]) -> "torch.Tensor | None":
        """A term added to the loss once per optimizer step (not per micro-batch); None: none."""
        return None

    def on_grads(self, params: dict[str, "torch.Tensor"]) -> None:
        """Called once per optimizer step, after the step's gradients are complete and before
        clipping and the optimizer: may change ``p.grad`` in place."""

    def finish(self, params: dict[str, "torch.Tensor"]) -> tuple[dict[str, Arrays], Arrays | None]:
        """After local training: (array groups to send beside the adapter, state to keep or None)."""
        return {}, None

    def make_optimizer(self, params: list["torch.Tensor"], cfg) -> "torch.optim.Optimizer":
        """The local optimizer over the parameters the client trains, made once per client and round;
        ``cfg`` is the run's TrainConfig. The base is the paper's AdamW (train.lr, train.weight_decay);
        an algorithm analysed for another optimizer (SCAFFOLD's plain SGD) returns its own."""
        import torch  # here, not at the top: this module loads no training code

        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    def metrics(self) -> dict[str, float]:
        """Numbers of its own to add to the client's metrics after training (e.g. how strong FedProx's
        pull was); {} for none."""
        return {}
