"""End to end on the tiny random Llama: training, checkpoints, resume, PEFT compatibility."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from fedit import runner, server
from fedit.protocol import Update
from fedit.adapter import load_adapter_file

from conftest import ROOT, tiny_config


def eval_losses(run_dir):
    return [row["eval"]["loss"] for row in server.RunDir(run_dir).events("round")]


def test_three_clients_two_rounds_fixed_losses(tmp_path, tiny_model_dir, partition_dir):
    cfg = tiny_config(tiny_model_dir, partition_dir, tmp_path / "run", federation={"clients_per_round": 3})
    run_dir = runner.run(cfg)
    rd = server.RunDir(run_dir)
    rounds = rd.events("round")
    clients = rd.events("client")
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert [sorted(r["clients"]) for r in rounds[1:]] == [[0, 1, 2], [0, 1, 2]]
    assert len(clients) == 6 and all(c["accepted"] for c in clients)
    losses = eval_losses(run_dir)
    # Fixed values under seed 7, fp32, torch 2.13 CPU: any change to masking, batching,
    # loss normalisation, LoRA init or aggregation moves them.
    assert losses == pytest.approx(EXPECTED_EVAL, rel=1e-4)
    assert [c["metrics"]["train_loss"] for c in clients] == pytest.approx(EXPECTED_TRAIN, rel=1e-4)
    assert losses[2] < losses[1] < losses[0]
    assert set(rounds[2]["eval"]["by_category"]) == {"brainstorming", "classification", "closed_qa", "open_qa"}
    for name in ["config.toml", "run.json", "state.json", "loss.png", "adapter/adapter_config.json",
                 "rounds/round_0000/adapter_model.safetensors", "rounds/round_0002/adapter_model.safetensors"]:
        assert (run_dir / name).exists(), name
    assert json.loads((run_dir / "state.json").read_text())["round"] == 2
    meta = json.loads((run_dir / "run.json").read_text())  # the fast paths chosen are on record
    assert (meta["compute_dtype"], meta["attention"], meta["packed_batches"]) == ("float32", "fedit_cpu_causal", True)


EXPECTED_EVAL = [5.912297826260328, 5.57610335201025, 5.211272478103638]
EXPECTED_TRAIN = [5.7829900799375595, 5.774497363700376, 5.789580851917985, 5.436602621367483, 5.421221393372368, 5.392046238089207]


def test_final_adapter_opens_in_peft_and_matches(tmp_path, tiny_model_dir, partition_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(tiny_model_dir, partition_dir, tmp_path / "run", federation={"rounds": 1})
    prep = runner.prepare(cfg)
    run_dir = runner.run(cfg, loaded=prep.loaded)
    adapter = load_adapter_file(run_dir / "adapter")
    assert torch.equal(adapter[next(iter(adapter))], load_adapter_file(run_dir / "rounds/round_0001")[next(iter(adapter))])
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, run_dir / "adapter").eval()
    ids = torch.tensor([[1, 5, 9, 20, 33, 7]])
    prep.loaded.model.eval()
    from fedit.adapter import set_adapter
    set_adapter(prep.loaded.model, adapter)
    with torch.no_grad():
        ours = prep.loaded.model(input_ids=ids).logits
        theirs = peft_model(input_ids=ids).logits
    assert torch.allclose(ours, theirs, atol=1e-5)
    # the trained adapter is not the identity: B matrices moved away from zero
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)


@pytest.mark.parametrize("strategy", ["fedavg", "scaffold"])
def test_resume_after_interruption_is_bit_identical(tmp_path, tiny_model_dir, partition_dir, strategy):
    """A crash mid-round 2, after one client of it trained (and, under SCAFFOLD, saved its new control
    variate): the resumed run redoes round 2 from the committed state and ends bit-identical."""
    fed = {"rounds": 3, "strategy": strategy}
    full = tiny_config(tiny_model_dir, partition_dir, tmp_path / "full", federation=fed)
    prep = runner.prepare(full)
    runner.run(full, loaded=prep.loaded)

    class Crash(Exception):
        pass

    part = tiny_config(tiny_model_dir, partition_dir, tmp_path / "part", federation=fed)
    real_fit = __import__("fedit.runtime.simulation", fromlist=["Simulation"]).Simulation.fit

    def crashing_fit(self, round_num, instructions):
        for i, u in enumerate(real_fit(self, round_num, instructions)):
            if round_num == 2 and i == 1:
                raise Crash()  # dies mid-round 2, after one client of it trained
            yield u

    from fedit.runtime import simulation
    simulation.Simulation.fit = crashing_fit
    try:
        with pytest.raises(Crash):
            runner.run(part, loaded=prep.loaded)
    finally:
        simulation.Simulation.fit = real_fit
    assert json.loads((tmp_path / "part/state.json").read_text())["round"] == 1
    runner.run(None, resume=str(tmp_path / "part"), loaded=prep.loaded)
    for r in range(4):
        a = load_adapter_file(tmp_path / f"full/rounds/round_{r:04d}")
        b = load_adapter_file(tmp_path / f"part/rounds/round_{r:04d}")
        assert all(torch.equal(a[k], b[k]) for k in a), f"round {r} differs"
    # metrics of the cut round were dropped and written again: same events as the full run
    untimed = lambda d: {k: untimed(v) if isinstance(v, dict) else v for k, v in d.items() if not k.endswith("seconds")}  # noqa: E731
    strip = lambda rows: [untimed(r) for r in rows]  # noqa: E731
    assert strip(server.RunDir(tmp_path / "part").events()) == strip(server.RunDir(tmp_path / "full").events())


@pytest.mark.parametrize("strategy", ["fedavg", "fedadam", "scaffold", "mixed-rank product"])
def test_kill_9_then_resume_cli(tmp_path, tiny_model_dir, partition_dir, strategy):
    """A real SIGKILL of `fedit run` in the middle of the run, then `fedit run --resume`: FedAdam's moments,
    SCAFFOLD's server and client control variates, and a mixed-rank FlexLoRA run come back as they were
    after the last round."""
    args = [f"data.clients_dir={partition_dir}", f"model.name={tiny_model_dir}", "model.dtype=fp32",
            "lora.r=4", "train.batch_size=4", "train.micro_batch_size=2", "train.cutoff_len=256",
            "federation.rounds=4", "federation.clients_per_round=2", "run.progress=false",
            *([f"federation.strategy={strategy}"] if strategy != "mixed-rank product" else
              ["lora.client_ranks=[1,2,4]", "lora.aggregation=product"])]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "fedit.cli", "run"]
    ref = subprocess.run(cmd + args + [f"run.out={tmp_path / 'ref'}"], env=env, capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr
    proc = subprocess.Popen(cmd + args + [f"run.out={tmp_path / 'cut'}"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state, metrics = tmp_path / "cut" / "state.json", tmp_path / "cut" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:  # kill once a client of round 2 has replied
        if state.exists() and json.loads(state.read_text())["round"] >= 1 and '"event": "client", "round": 2' in \
                metrics.read_text():
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert json.loads(state.read_text())["round"] == 1, "killed mid-round 2: one client had replied, not both"
    res = subprocess.run(cmd + ["--resume", str(tmp_path / "cut")], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    for r in range(5):
        a = load_adapter_file(tmp_path / f"ref/rounds/round_{r:04d}")
        b = load_adapter_file(tmp_path / f"cut/rounds/round_{r:04d}")
        assert all(torch.equal(a[k], b[k]) for k in a), r
    if strategy in ("fedadam", "scaffold"):  # the strategy's state moved, so the comparison above covers it
        assert json.loads((tmp_path / "cut/state.json").read_text())["strategy_state"]


def test_bad_client_update_is_rejected_and_logged(tmp_path, tiny_model_dir, partition_dir):
    from fedit.runtime import simulation

    cfg = tiny_config(tiny_model_dir, partition_dir, tmp_path / "run", federation={"rounds": 1, "clients_per_round": 3})
    real_fit = simulation.Simulation.fit

    def poisoned(self, r, instructions):
        for u in real_fit(self, r, instructions):
            if u.client_id == instructions[0].client_id:
                k = next(iter(u.adapter))
                u.adapter[k] = torch.full_like(u.adapter[k], float("nan"))
            yield u

    simulation.Simulation.fit = poisoned
    try:
        run_dir = runner.run(cfg)
    finally:
        simulation.Simulation.fit = real_fit
    rd = server.RunDir(run_dir)
    (row,) = [r for r in rd.events("round") if r["round"] == 1]
    assert row["accepted"] == 2 and len(row["rejected"]) == 1 and "NaN" in row["rejected"][0]["reason"]
    adapter = load_adapter_file(run_dir / "adapter")
    assert all(torch.isfinite(v).all() for v in adapter.values())


def test_check_update_reasons():
    ref = {"a": torch.zeros(2, 2)}
    up = lambda a, n=3, **more: Update(0, {"adapter": a, **more}, n)  # noqa: E731
    assert server.check_update(up({"a": torch.ones(2, 2)}), ref) is None
    assert "num_examples" in server.check_update(up({"a": torch.ones(2, 2)}, 0), ref)
    assert "num_examples" in server.check_update(up({"a": torch.ones(2, 2)}, True), ref)  # a bool is no count
    assert "shape" in server.check_update(up({"a": torch.ones(3, 2)}), ref)
    assert "keys differ" in server.check_update(up({"b": torch.ones(2, 2)}), ref)
    assert "NaN or Inf" in server.check_update(up({"a": torch.full((2, 2), float("inf"))}), ref)
    # a strategy that expects a second group (SCAFFOLD's control delta) checks it the same way
    groups = ("adapter", "control_delta")
    assert "array groups" in server.check_update(up({"a": torch.ones(2, 2)}), ref, groups)
    assert "control_delta: a contains NaN" in server.check_update(
        up({"a": torch.ones(2, 2)}, control_delta={"a": torch.full((2, 2), float("nan"))}), ref, groups)
