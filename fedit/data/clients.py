"""The clients of a partition directory: ids, example counts, and tokenized examples on demand.

Nothing is kept per client: a client's file is read and tokenized when it is
picked, so registering 1,000 clients costs no more memory than 10.

With data.client_validation each client's records are split into a training part
and a validation part (fedit.data.partition.split_validation: drawn from the seed
and the client id alone), so every runtime holds back the same records; training
never sees the validation part.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from fedit.data.batches import Example, tokenize
from fedit.data.partition import read_manifest, split_validation, validation_size
from fedit.data.records import Record, load_records
from fedit.errors import FeditError


class ClientFiles:
    def __init__(self, clients_dir: str | Path, tokenizer, cutoff_len: int, train_on_inputs: bool, template: str,
                 validation=0, seed: int = 42, eval_cutoff_len: int = 0):
        self.dir = Path(clients_dir)
        self.manifest = read_manifest(self.dir)
        self.files = {c["id"]: self.dir / c["file"] for c in self.manifest["clients"]}
        missing = [str(p) for p in self.files.values() if not p.is_file()]
        if missing:
            raise FeditError(f"client files listed in {self.dir / 'manifest.json'} are missing: {', '.join(missing[:3])}; "
                             f"run `fedit partition` again")
        self._tok = (tokenizer, cutoff_len, train_on_inputs, template)
        self.validation, self.seed, self.eval_cutoff_len = validation, seed, eval_cutoff_len or cutoff_len

    @property
    def ids(self) -> list[int]:
        return sorted(self.files)

    def sizes(self) -> dict[int, tuple[int, int]]:
        """Client id -> (training records, validation records), from the manifest's counts."""
        return {c["id"]: (c["examples"] - validation_size(c["examples"], self.validation),
                          validation_size(c["examples"], self.validation)) for c in self.manifest["clients"]}

    def records(self, client_id: int) -> tuple[list[Record], list[Record]]:
        """(training records, validation records) of a client."""
        records = load_records(self.files[client_id]).records
        train, val = split_validation(len(records), self.validation, self.seed, client_id)
        return [records[i] for i in train], [records[i] for i in val]

    def examples(self, client_id: int, transform: Callable[[list[Record]], list[Record]] | None = None) -> list[Example]:
        """A client's tokenized training examples; ``transform`` changes them first (a simulated attacker's data)."""
        tokenizer, cutoff, train_on_inputs, template = self._tok
        records = self.records(client_id)[0]
        return tokenize(transform(records) if transform else records, tokenizer, cutoff, train_on_inputs, template)

    def validation_examples(self, client_id: int) -> list[Example]:
        """A client's tokenized validation examples, at the evaluation cutoff (as the server's test set)."""
        tokenizer, _, train_on_inputs, template = self._tok
        return tokenize(self.records(client_id)[1], tokenizer, self.eval_cutoff_len, train_on_inputs, template)
