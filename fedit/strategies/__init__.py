"""Strategy registry: one class per file, looked up by the name in federation.strategy.

Importing it loads the strategies' maths only (torch and fedit.protocol), never the training
code, so config validation stays light and import cycles cannot form.
"""

from fedit.strategies.base import Strategy
from fedit.strategies.fedadagrad import FedAdagrad
from fedit.strategies.fedadam import FedAdam
from fedit.strategies.fedavg import FedAvg
from fedit.strategies.fedavgm import FedAvgM
from fedit.strategies.fedprox import FedProx
from fedit.strategies.fedyogi import FedYogi
from fedit.strategies.scaffold import Scaffold

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (FedAvg, FedProx, FedAvgM, FedAdam, FedYogi, FedAdagrad, Scaffold)}


def build(cfg, num_clients: int) -> Strategy:
    """The strategy of a validated Config, with its options, for ``num_clients`` registered clients."""
    fed = cfg.federation
    return STRATEGIES[fed.strategy](cfg.strategy, num_clients, aggregator=fed.aggregator,
                                    trim_fraction=fed.trim_fraction, byzantine_clients=fed.byzantine_clients,
                                    max_update_norm=fed.max_update_norm)
