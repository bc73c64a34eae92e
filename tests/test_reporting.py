"""Watching a run: the scalars each round reports, read back from TensorBoard's and W&B's own files."""

import glob
import json
import struct

import pytest

from fedit import reporting, runner, server
from fedit.errors import FeditError

from conftest import tiny_config


def test_round_scalars_worked_by_hand():
    row = {"round": 3, "accepted": 2, "rejected": [{"client": 9, "reason": "x"}], "seconds": 12.5,
           "eval": {"loss": 2.25, "by_category": {"open_qa": 2.0, "closed_qa": 2.5}}}
    clients = [
        {"client": 1, "accepted": True, "bytes_down": 100, "bytes_up": 100,
         "metrics": {"train_loss": 2.0, "trained_tokens": 100, "seconds": 10.0, "steps": 3}},
        {"client": 4, "accepted": True, "bytes_down": 100, "bytes_up": 60,
         "metrics": {"train_loss": 4.0, "trained_tokens": 300, "seconds": 30.0, "steps": True,  # a bool is no count
                     "note": "hi"}},
        {"client": 9, "accepted": False, "reason": "x", "metrics": {"train_loss": 99.0}},
        {"client": 5, "accepted": True, "metrics": {"train_loss": float("nan"), "trained_tokens": "many"}},
    ]
    s = reporting.scalars(row, clients)
    assert s["eval/loss"] == 2.25 and s["eval_by_category/closed_qa"] == 2.5
    assert s["round/accepted"] == 2 and s["round/rejected"] == 1 and s["round/seconds"] == 12.5
    assert s["round/bytes_down"] == 200 and s["round/bytes_up"] == 160  # the rejected client sent nothing counted
    assert s["train/loss"] == pytest.approx((2.0 * 100 + 4.0 * 300) / 400)  # token-weighted: 3.5
    assert s["train/tokens_per_second"] == pytest.approx(400 / 40)
    assert s["client/00001/tokens_per_second"] == 10.0 and s["client/00001/steps"] == 3
    assert "client/00004/steps" not in s and "client/00009/train_loss" not in s
    assert not any(k.startswith("client/00005/") for k in s)  # NaN and a string are not reported
    assert reporting.scalars({"round": 0, "accepted": 0, "eval": {"loss": 3.0, "by_category": {}}}, []) == \
        {"eval/loss": 3.0}


def wandb_history(run_dir):
    """The history records of an offline W&B run, read from its .wandb file (LevelDB log format
    of protobuf Records, as W&B writes them)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    data, pos, buf, rows = open(path, "rb").read(), 7, b"", {}
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        buf, pos = buf + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0 and length == 0:
            break
        if kind in (1, 4):  # a full record, or the last piece of one
            rec = pb.Record()
            rec.ParseFromString(buf)
            buf = b""
            if rec.WhichOneof("record_type") == "history":
                rows[rec.history.step.num] = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                             for i in rec.history.item}
    return rows


def test_tensorboard_and_wandb_hold_the_rounds(tmp_path, tiny_model_dir, partition_dir, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = tiny_config(tiny_model_dir, partition_dir, tmp_path / "run", run={"report_to": ["tensorboard", "wandb"]})
    run_dir = runner.run(cfg)
    rd = server.RunDir(run_dir)
    rounds, clients = rd.events("round"), rd.events("client")

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    loss = [(e.step, e.value) for e in acc.Scalars("eval/loss")]
    assert loss == [(r["round"], pytest.approx(r["eval"]["loss"], rel=1e-6)) for r in rounds]
    for cat, value in rounds[-1]["eval"]["by_category"].items():
        assert acc.Scalars(f"eval_by_category/{cat}")[-1].value == pytest.approx(value, rel=1e-6)
    for c in clients:
        (point,) = [e for e in acc.Scalars(f"client/{c['client']:05d}/train_loss") if e.step == c["round"]]
        assert point.value == pytest.approx(c["metrics"]["train_loss"], rel=1e-6)
    assert {"train/loss", "train/tokens_per_second", "round/bytes_up", "round/seconds"} <= set(tags)

    history = wandb_history(run_dir)
    assert sorted(history) == [0, 1, 2]
    assert [history[r["round"]]["eval/loss"] for r in rounds] == pytest.approx([r["eval"]["loss"] for r in rounds])
    assert history[1]["round/accepted"] == rounds[1]["accepted"]


def test_report_to_is_checked():
    from fedit import config

    with pytest.raises(FeditError, match=r"'mlflow' unknown; choose from tensorboard, wandb"):
        config.load(None, ["run.report_to=['mlflow']"])
    assert config.load(None, ["run.report_to=[]"]).run.report_to == ()
    assert config.load(None, []).run.report_to == ("tensorboard",)  # watching is on by default


def test_wandb_that_cannot_start_is_one_clear_message(tmp_path, monkeypatch):
    import wandb

    def refuse(**kw):
        raise RuntimeError("api_key not configured (no-tty)")

    monkeypatch.setattr(wandb, "init", refuse)
    with pytest.raises(FeditError, match=r"Weights & Biases could not start \(RuntimeError: api_key not configured"):
        reporting.open_reporters(("wandb",), tmp_path)
