import pytest

from fedit import config
from fedit.errors import FeditError


def test_defaults_follow_the_paper():
    cfg = config.load()
    assert cfg.lora.r == 8 and cfg.train.lr == 1.5e-4 and cfg.train.batch_size == 32
    assert cfg.federation.rounds == 20 and cfg.federation.clients_per_round == 5
    assert cfg.train.cutoff_len == 512 and cfg.lora.target_modules == ("all-linear",)


def test_file_plus_overrides(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[train]\nlr = 3e-4\nmicro_batch_size = 4\n[lora]\ntarget_modules = ["q_proj", "v_proj"]\n')
    cfg = config.load(f, ["train.lr=1e-3", "federation.rounds=3", "run.out=runs/x", "model.dtype=fp32"])
    assert cfg.train.lr == 1e-3 and cfg.train.micro_batch_size == 4
    assert cfg.federation.rounds == 3 and cfg.run.out == "runs/x" and cfg.model.dtype == "fp32"
    assert cfg.lora.target_modules == ("q_proj", "v_proj")


def test_every_problem_reported_at_once(tmp_path):
    with pytest.raises(FeditError) as e:
        config.load(None, ["train.lr=-1", "train.nope=3", "lora.r=two", "model.dtype=fp16", "bogus.x=1",
                           "federation.strategy=fedfoo", "noequals"])
    msg = str(e.value)
    for part in ["train.lr = -1", "unknown key train.nope", "lora.r = 'two'", "model.dtype = 'fp16'",
                 "unknown section [bogus]", "'noequals' must look like section.key=value",
                 "federation.strategy = 'fedfoo': choose one of fedavg, fedprox"]:
        assert part in msg, part
    assert msg.startswith("7 problem(s)")


def test_cross_field_checks():
    with pytest.raises(FeditError, match="multiple of train.micro_batch_size"):
        config.load(None, ["train.batch_size=10", "train.micro_batch_size=4"])
    with pytest.raises(FeditError, match="choose one of fedavg"):
        config.load(None, ["federation.strategy=fedfoo"])
    with pytest.raises(FeditError, match="model.quantize needs a CUDA GPU"):
        config.load(None, ["model.quantize=4bit", "model.device=cpu"])


def test_attack_boost_is_for_the_backdoor_only():
    with pytest.raises(FeditError, match="attack.boost applies to attack.kind = \"backdoor\" only"):
        config.from_dict({"attack": {"kind": "scale", "clients": [1], "boost": 5.0}})
    assert config.from_dict({"attack": {"kind": "backdoor", "clients": [1], "boost": 5.0}}).attack.boost == 5.0


def test_bad_toml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nlr=")
    with pytest.raises(FeditError, match="not valid TOML"):
        config.load(bad)
    with pytest.raises(FeditError, match="does not exist"):
        config.load(tmp_path / "missing.toml")


def test_resolved_config_round_trips(tmp_path):
    cfg = config.load(None, ["train.lr=2e-4", "data.clients_dir=a b/\"c\"", "lora.target_modules=q_proj,k_proj"])
    f = tmp_path / "resolved.toml"
    f.write_text(config.to_toml(cfg))
    assert config.load(f) == cfg


def test_describe_lists_every_key():
    text = config.describe()
    assert "train.micro_batch_size" in text and "federation.min_replies" in text


def test_strategy_options_are_checked_against_the_chosen_strategy():
    cfg = config.load(None, ["federation.strategy=fedadam", "strategy.eta=0.01"])
    assert (cfg.strategy.eta, cfg.strategy.beta_1, cfg.strategy.tau) == (0.01, 0.9, 1e-6)
    assert config.load(None, ["federation.strategy=fedprox"]).strategy.proximal_mu == 0.01
    with pytest.raises(FeditError) as e:
        config.load(None, ["federation.strategy=fedprox", "strategy.eta=1", "strategy.proximal_mu=-1"])
    msg = str(e.value)
    assert "unknown key strategy.eta; known keys: proximal_mu, server_learning_rate" in msg
    assert "strategy.proximal_mu = -1" in msg and msg.startswith("2 problem(s)")
    with pytest.raises(FeditError, match="strategy.server_momentum = 1.0: must be < 1.0"):
        config.load(None, ["federation.strategy=fedavgm", "strategy.server_momentum=1.0"])
    # a misspelt strategy is an error, never a silent fallback to fedavg
    with pytest.raises(FeditError, match="'fedadgrad': choose one of .*fedadagrad"):
        config.load(None, ["federation.strategy=fedadgrad"])


def test_strategy_options_round_trip_and_reset_with_a_new_strategy(tmp_path):
    cfg = config.load(None, ["federation.strategy=fedyogi", "strategy.tau=1e-4"])
    f = tmp_path / "resolved.toml"
    f.write_text(config.to_toml(cfg))
    assert config.load(f) == cfg and "[strategy]\neta = 0.001" in f.read_text()
    other = cfg.replace(federation={"strategy": "scaffold"})
    assert other.strategy == type(other.strategy)()  # scaffold's defaults, not fedyogi's table


def test_describe_documents_every_strategy_and_option():
    from fedit.strategies import STRATEGIES
    import dataclasses

    text = config.describe()
    for name, cls in STRATEGIES.items():
        assert f"  {name}: " in text, name
        for f in dataclasses.fields(cls.Options):
            assert f"strategy.{f.name} = " in text, (name, f.name)


def test_config_validation_does_not_import_the_training_code():
    """config -> strategies must not reach client, model or transformers (once a cycle, and a slow import)."""
    import subprocess
    import sys

    code = ("import sys; from fedit import config; config.load(None, ['federation.strategy=scaffold']); "
            "config.describe(); print(sorted(m for m in ('fedit.client', 'fedit.model', 'fedit.server', "
            "'transformers', 'peft') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_negative_seed_is_a_config_error():
    with pytest.raises(FeditError, match="federation.seed = -1: must be >= 0"):
        config.load(None, ["federation.seed=-1"])
