"""The command line: what a user types, what they see, and the exit codes."""

import json

from fedit.cli import main

from conftest import write_jsonl


def test_partition_command(tmp_path, records_file, capsys):
    out = tmp_path / "parts"
    assert main(["partition", "--data", str(records_file), "--clients", "3", "--scheme", "shards",
                 "--test-per-category", "1", "--out", str(out)]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["scheme"] == "shards" and len(m["clients"]) == 3 and m["test"]["examples"] == 4
    assert "shards split over 3 clients" in capsys.readouterr().out


def test_partition_reports_skipped_rows(tmp_path, capsys):
    f = write_jsonl(tmp_path / "d.jsonl", [{"instruction": f"q{i}", "response": "a", "category": "c"} for i in range(6)]
                    + [{"instruction": "", "response": "a"}])
    assert main(["partition", "--data", str(f), "--clients", "2", "--scheme", "iid", "--test-per-category", "1",
                 "--out", str(tmp_path / "p")]) == 0
    assert "1 rows skipped: line 7: empty instruction" in capsys.readouterr().out
    assert json.loads((tmp_path / "p/manifest.json").read_text())["skipped"] == [
        {"line": 7, "reason": "empty instruction (field 'instruction')"}]


def test_user_errors_exit_2_with_one_message(tmp_path, capsys):
    assert main(["partition", "--data", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()  # nothing half-written

    assert main(["run", "train.lr=abc", "train.micro_batch_size=0"]) == 2
    err = capsys.readouterr().err
    assert "2 problem(s)" in err and "train.lr = 'abc'" in err and "train.micro_batch_size = 0" in err

    # The default data is the paper's Dolly hub id; without hub access the message says to pass a file.
    assert main(["run", f"run.out={tmp_path / 'r'}"]) == 2
    err = capsys.readouterr().err
    assert "could not load hub dataset 'databricks/databricks-dolly-15k'" in err and "JSON/JSONL path" in err
    assert not (tmp_path / "r").exists()

    assert main(["bench", "--protocol-rounds", "21", "--out", str(tmp_path / "b")]) == 2
    assert "pass 0 to 20" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()

    assert main(["run", "--resume", str(tmp_path)]) == 2
    assert "not a fedit run directory" in capsys.readouterr().err


def test_run_refuses_to_overwrite_a_run(tmp_path, tiny_model_dir, partition_dir, capsys):
    args = ["run", f"data.clients_dir={partition_dir}", f"model.name={tiny_model_dir}", "model.dtype=fp32",
            "federation.rounds=1", "federation.clients_per_round=1", "train.max_steps=1", "train.batch_size=2",
            "train.micro_batch_size=2", "lora.r=2", f"run.out={tmp_path / 'r'}", "run.progress=false"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "test loss (server's held-out set):" in out and "final adapter" in out
    assert main(args) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_bad_model_name_is_clear(tmp_path, partition_dir, capsys):
    assert main(["run", f"data.clients_dir={partition_dir}", f"model.name={tmp_path / 'nope.gguf'}",
                 f"run.out={tmp_path / 'r'}"]) == 2
    assert "GGUF file not found" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_one_command_partitions_the_source_into_the_run(tmp_path, tiny_model_dir, records_file, capsys):
    run = tmp_path / "r"
    args = ["run", f"data.source={records_file}", "data.clients=3", "data.scheme=iid", "data.test_per_category=1",
            "data.seed=5", f"model.name={tiny_model_dir}", "model.dtype=fp32", "federation.rounds=1",
            "federation.clients_per_round=2", "train.max_steps=1", "train.batch_size=2", "train.micro_batch_size=2",
            "lora.r=2", f"run.out={run}", "run.progress=false"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "iid split over 3 clients: 44 records" in out and "test loss (server's held-out set):" in out
    # the same split `fedit partition` makes with the same options, file for file
    assert main(["partition", "--data", str(records_file), "--clients", "3", "--scheme", "iid",
                 "--test-per-category", "1", "--seed", "5", "--out", str(tmp_path / "p")]) == 0
    for f in ("client_000.jsonl", "client_002.jsonl", "test.jsonl"):
        assert (run / "data" / f).read_bytes() == (tmp_path / "p" / f).read_bytes()

    # A resumed run must train on the data it started with: a changed client file is refused.
    assert main(["run", "--resume", str(run)]) == 0  # unchanged: nothing left to do, no error
    capsys.readouterr()
    with open(run / "data" / "client_001.jsonl", "a") as f:
        f.write(json.dumps({"instruction": "new", "response": "row", "category": "open_qa"}) + "\n")
    assert main(["run", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert "partition of this run changed since it started" in err and "Traceback" not in err
