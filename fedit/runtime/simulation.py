"""In-process simulation: one frozen base model in memory, the adapter swapped per client.

Clients are trained one after another on the same model object; each starts by
loading the global adapter through the adapter door (set_adapter), so no
client sees another's weights and memory does not grow with the client count.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

from fedit import client
from fedit.client import Update
from fedit.config import Config
from fedit.data.clients import ClientFiles
from fedit.model import Adapter, Loaded


class Simulation:
    def __init__(self, loaded: Loaded, clients: ClientFiles, cfg: Config,
                 on_client: Callable[[int, int], Callable[[int, int], None] | None] | None = None):
        self.loaded, self.clients, self.cfg = loaded, clients, cfg
        self.on_client = on_client  # (round, client) -> per-step callback, for progress bars

    def fit(self, round_num: int, client_ids: list[int], global_adapter: Adapter) -> Iterator[Update]:
        # A generator: each client trains only when the strategy asks for its update.
        for cid in client_ids:
            on_step = self.on_client(round_num, cid) if self.on_client else None
            yield client.train(self.loaded, global_adapter, self.clients.examples(cid), self.cfg.train,
                               client.seed_for(self.cfg.federation.seed, round_num, cid), cid, on_step)
