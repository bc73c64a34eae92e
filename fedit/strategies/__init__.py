"""Strategy registry: one class per file, looked up by the name in federation.strategy."""

from fedit.strategies.base import Strategy
from fedit.strategies.fedavg import FedAvg

STRATEGIES: dict[str, type[Strategy]] = {cls.name: cls for cls in (FedAvg,)}


def get(name: str) -> Strategy:
    return STRATEGIES[name]()
