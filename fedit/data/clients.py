"""The clients of a partition directory: ids, example counts, and tokenized examples on demand.

Nothing is kept per client: a client's file is read and tokenized when it is
picked, so registering 1,000 clients costs no more memory than 10.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from fedit.data.batches import Example, tokenize
from fedit.data.partition import read_manifest
from fedit.data.records import Record, load_records
from fedit.errors import FeditError


class ClientFiles:
    def __init__(self, clients_dir: str | Path, tokenizer, cutoff_len: int, train_on_inputs: bool, template: str):
        self.dir = Path(clients_dir)
        self.manifest = read_manifest(self.dir)
        self.files = {c["id"]: self.dir / c["file"] for c in self.manifest["clients"]}
        missing = [str(p) for p in self.files.values() if not p.is_file()]
        if missing:
            raise FeditError(f"client files listed in {self.dir / 'manifest.json'} are missing: {', '.join(missing[:3])}; "
                             f"run `fedit partition` again")
        self._tok = (tokenizer, cutoff_len, train_on_inputs, template)

    @property
    def ids(self) -> list[int]:
        return sorted(self.files)

    def examples(self, client_id: int, transform: Callable[[list[Record]], list[Record]] | None = None) -> list[Example]:
        """A client's tokenized examples; ``transform`` changes its records first (a simulated attacker's data)."""
        tokenizer, cutoff, train_on_inputs, template = self._tok
        records = load_records(self.files[client_id]).records
        return tokenize(transform(records) if transform else records, tokenizer, cutoff, train_on_inputs, template)
