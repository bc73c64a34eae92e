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
    assert (cfg.strategy.eta, cfg.strategy.beta_1, cfg.strategy.tau) == (0.01, 0.9, 0.0)  # tau 0: derived in round 1
    assert config.load(None, ["federation.strategy=fedprox"]).strategy.proximal_mu == 0.1
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
    assert config.load(f) == cfg and "[strategy]\neta = 0.0\nbeta_1 = 0.9\nbeta_2 = 0.99\ntau = 0.0001" in f.read_text()
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


def test_cover_selection_with_poisson_sampling_is_an_error():
    config.load(None, ["federation.selection=cover"])  # alone it is fine
    with pytest.raises(FeditError, match='selection = "cover" does not combine with privacy.sampling = "poisson"'):
        config.load(None, ["federation.selection=cover", "privacy.enabled=true", "privacy.sampling=poisson"])


# ---------------------------------------------------------------- settings that would do nothing

# A valid value other than the default for every key of the switched-off features (chosen by hand).
SWITCHED_OFF = {
    "privacy": ("privacy.enabled = true", {
        "clipping_norm": 0.5, "noise_multiplier": 1.3, "target_epsilon": 8.0, "delta": 1e-6, "max_epsilon": 10.0,
        "sampling": "poisson", "adaptive": True, "target_quantile": 0.7, "clip_learning_rate": 0.1,
        "count_noise": 0.5}),
    "secagg": ("secagg.enabled = true", {
        "num_shares": 0.5, "reconstruction_threshold": 0.8, "clipping_range": 2.0, "quantization_range": 1024,
        "modulus_range": 2**20}),
    "attack": ("set attack.kind", {
        "clients": [1, 2], "fraction": 0.2, "factor": 100.0, "boost": 5.0, "trigger": "zz", "target": "yy"}),
    "canary": ("set canary.client", {"count": 3, "repeats": 2, "references": 50, "seed": 7}),
}


def _toml_value(v):
    return "true" if v is True else f'"{v}"' if isinstance(v, str) else str(v)


def test_every_key_of_a_switched_off_feature_is_one_error_naming_the_switch(tmp_path):
    import dataclasses

    for section, (fix, values) in SWITCHED_OFF.items():
        cls = type(getattr(config.Config(), section))
        switch = config.SWITCHES[section][0]
        assert set(values) == {f.name for f in dataclasses.fields(cls)} - {switch}, section  # every key covered
        for key, value in values.items():
            with pytest.raises(FeditError) as e:
                config.load(None, [f"{section}.{key}={_toml_value(value)}"])
            msg = str(e.value)
            assert msg.startswith("1 problem(s)") and f"{section}.{key} is set but {section}.{switch} = " in msg, msg
            assert fix in msg, msg
            f = tmp_path / f"{section}-{key}.toml"  # the same from a file
            f.write_text(f"[{section}]\n{key} = {_toml_value(value)}\n")
            with pytest.raises(FeditError, match=f"{section}.{key} is set but {section}.{switch}"):
                config.load(f)


def test_the_issue_example_names_privacy_enabled_once_and_the_cli_prints_no_traceback(capsys):
    from fedit.cli import main

    with pytest.raises(FeditError) as e:
        config.load(None, ["privacy.noise_multiplier=1.3", "privacy.clipping_norm=0.5"])
    assert str(e.value) == ("1 problem(s) in defaults + overrides:\n  - privacy.clipping_norm, privacy.noise_multiplier "
                            "are set but privacy.enabled = false: this run would have no differential privacy at all; "
                            "set privacy.enabled = true, or remove them")
    assert main(["run", "privacy.noise_multiplier=1.3", "privacy.clipping_norm=0.5"]) == 2
    err = capsys.readouterr().err
    assert "privacy.enabled = true" in err and "Traceback" not in err
    # the switch is never implied by its parameters: with it on, the same keys are what they say
    cfg = config.load(None, ["privacy.enabled=true", "privacy.noise_multiplier=1.3", "privacy.clipping_norm=0.5"])
    assert (cfg.privacy.enabled, cfg.privacy.noise_multiplier, cfg.privacy.clipping_norm) == (True, 1.3, 0.5)


def test_options_of_an_inner_switch_or_another_aggregator_are_refused():
    cases = {
        ("federation.aggregator=median", "federation.trim_fraction=0.2"):
            'federation.trim_fraction is read by federation.aggregator = "trimmed_mean" only; it is "median"',
        ("federation.byzantine_clients=2",):
            'federation.byzantine_clients is read by federation.aggregator = "krum" or "multikrum" only; it is "mean"',
        ("federation.assumed_bad_fraction=0.2",): "(the mean tolerates no bad client)",
        ("federation.aggregator=trimmed_mean", "federation.trim_fraction=0.3", "federation.assumed_bad_fraction=0.2"):
            "federation.trim_fraction = 0.3 and federation.assumed_bad_fraction = 0.2 (the trim it sets) disagree",
        ("federation.aggregator=multikrum", "federation.clients_per_round=10", "federation.byzantine_clients=0",
         "federation.assumed_bad_fraction=0.2"): "(f = ⌊0.2 × 10⌋ = 2) disagree; keep one",
        ("privacy.enabled=true", "privacy.target_quantile=0.3"): "set privacy.adaptive = true",
        ("privacy.enabled=true", "privacy.target_epsilon=4", "privacy.noise_multiplier=2"):
            "privacy.noise_multiplier is set but privacy.target_epsilon chooses the noise instead",
        ("attack.kind=scale", "attack.clients=[1]", "attack.trigger=x"): 'applies to attack.kind = "backdoor" only',
        ("attack.kind=backdoor", "attack.clients=[1]", "attack.factor=3"): "its strength is attack.boost",
    }
    for overrides, words in cases.items():
        with pytest.raises(FeditError) as e:
            config.load(None, list(overrides))
        assert str(e.value).startswith("1 problem(s)") and words in str(e.value), (overrides, str(e.value))


def test_a_file_key_at_its_default_is_not_set_so_a_saved_config_serves_as_a_template(tmp_path):
    f = tmp_path / "mine.toml"
    f.write_text(config.to_toml(config.load()).replace('out = "runs/fedit"', 'out = "runs/mine"'))
    assert "[privacy]\nenabled = false\nclipping_norm = 0.1" in f.read_text()  # every key is written
    assert config.load(f).run.out == "runs/mine"
    f.write_text(f.read_text().replace("noise_multiplier = 1.0", "noise_multiplier = 1.3"))
    with pytest.raises(FeditError, match="privacy.noise_multiplier is set but privacy.enabled = false"):
        config.load(f)
    # on the command line a key counts as set even at its default value
    with pytest.raises(FeditError, match="privacy.noise_multiplier is set"):
        config.load(None, ["privacy.noise_multiplier=1.0"])


def test_resuming_an_old_run_and_replace_never_trip_the_unused_settings_check(tmp_path):
    from fedit import runner

    # a run directory of an older fedit that accepted (and ignored) a noise multiplier without privacy
    old = config.from_dict({"privacy": {"noise_multiplier": 1.3}, "attack": {"factor": 100.0},
                            "federation": {"byzantine_clients": 2}})
    run_dir = tmp_path / "run"
    (run_dir / "rounds").mkdir(parents=True)
    (run_dir / "config.toml").write_text(config.to_toml(old))
    (run_dir / "run.json").write_text("{}")
    cfg, where = runner.resolve_run(None, str(run_dir))
    assert cfg == old and where == run_dir and cfg.privacy.noise_multiplier == 1.3
    # the same file outside a run directory is a user's file: refused, one message per feature
    copy = tmp_path / "copy" / "config.toml"
    copy.parent.mkdir()
    copy.write_text((run_dir / "config.toml").read_text())
    with pytest.raises(FeditError) as e:
        config.load(copy)
    assert str(e.value).startswith("3 problem(s)") and "privacy.enabled" in str(e.value)
    # Config.replace goes through from_dict with every key, the user's intent long resolved
    backdoor = config.from_dict({"attack": {"kind": "backdoor", "clients": [1], "boost": 5.0}})
    assert backdoor.replace(attack={"kind": "none"}).attack == type(backdoor.attack)(boost=5.0, clients=(1,))
    krum = config.from_dict({"federation": {"aggregator": "multikrum", "byzantine_clients": 1}})
    assert krum.replace(federation={"aggregator": "mean"}).federation.byzantine_clients == 1


def test_assumed_bad_fraction_sets_the_aggregators_parameter_and_survives_save_and_replace(tmp_path):
    cfg = config.load(None, ["federation.aggregator=multikrum", "federation.clients_per_round=10",
                             "federation.assumed_bad_fraction=0.2"])
    assert cfg.federation.byzantine_clients == 2  # ⌊0.2 × 10⌋
    f = tmp_path / "resolved.toml"
    f.write_text(config.to_toml(cfg))
    assert config.load(f) == cfg  # the saved f agrees with the share
    assert cfg.replace(federation={"clients_per_round": 20}).federation.byzantine_clients == 4
    trimmed = cfg.replace(federation={"aggregator": "trimmed_mean"}).federation
    assert (trimmed.trim_fraction, trimmed.byzantine_clients) == (0.2, 0)
    # 0.29 of 100 is 29 clients, not the 28 of 0.29 * 100 = 28.999999999999996
    assert config.load(None, ["federation.aggregator=krum", "federation.clients_per_round=100",
                              "federation.assumed_bad_fraction=0.29"]).federation.byzantine_clients == 29
    with pytest.raises(FeditError, match=r"byzantine_clients = 3 and federation.assumed_bad_fraction = 0.2 \(f = "
                                         r"⌊0.2 × 10⌋ = 2\) disagree; keep one"):
        cfg.replace(federation={"byzantine_clients": 3})


def test_a_robust_aggregator_that_would_be_the_mean_is_refused_with_its_fix():
    cases = {  # each: one message, and what it names
        ("federation.aggregator=multikrum",):
            'with federation.byzantine_clients = 0 keeps every client: it is the mean; set '
            'federation.byzantine_clients = f >= 1, the bad clients per round it must tolerate (at most 1 with 5 '
            'clients per round), or federation.assumed_bad_fraction (e.g. 0.2)',
        ("federation.aggregator=krum",): "promises to tolerate no bad client",
        ("federation.aggregator=trimmed_mean",):  # the default trim 0.1 of the default 5 clients
            "drops ⌊0.1 × 5⌋ = 0 values at each end of a round of 5 clients: it is the mean; set "
            "federation.trim_fraction >= 0.2",
        ("federation.aggregator=trimmed_mean", "federation.clients_per_round=2", "federation.trim_fraction=0.4"):
            "use at least 3 clients per round",
        ("federation.aggregator=median", "federation.clients_per_round=2"): "the median of 2 is their mean",
        ("federation.aggregator=multikrum", "federation.clients_per_round=10", "federation.assumed_bad_fraction=0.05"):
            "assumes ⌊0.05 × 10⌋ = 0 bad clients, and with f = 0 it keeps every client: it is the mean; raise it to "
            "at least 0.1",
        ("federation.aggregator=krum", "federation.byzantine_clients=2", "federation.clients_per_round=6"):
            "only with more than 6 clients per round (Blanchard et al.); a round has 6: lower f to 1",
        # federation.fraction > 0: the round's size from data.clients, checked all the same (0.04 of 100 = 4)
        ("federation.aggregator=krum", "federation.byzantine_clients=1", "federation.fraction=0.04"):
            "only with more than 4 clients per round (Blanchard et al.); a round has 4",
        ("federation.aggregator=multikrum", "federation.fraction=0.5", "data.clients_dir=parts",
         "federation.assumed_bad_fraction=0.2"): "which federation.fraction = 0.5 leaves to the partition",
    }
    for overrides, words in cases.items():
        with pytest.raises(FeditError) as e:
            config.load(None, list(overrides))
        assert str(e.value).startswith("1 problem(s)") and words in str(e.value), (overrides, str(e.value))
    ok = config.load(None, ["federation.aggregator=trimmed_mean", "federation.trim_fraction=0.2"])
    assert ok.federation.trim_fraction == 0.2


# ---------------------------------------------------------------- numbers

def test_nan_infinity_and_huge_numbers_are_refused_all_at_once(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("[privacy]\nenabled = true\ndelta = nan\nclipping_norm = nan\ntarget_epsilon = nan\n"
                 "[federation]\nmax_value = nan\nrounds = 100000000000000000000\n"
                 "[train]\nlr = 1e400\nweight_decay = -inf\n[strategy]\nserver_learning_rate = inf\n")
    with pytest.raises(FeditError) as e:
        config.load(f, ["federation.max_update_norm=nan", "train.max_grad_norm=" + "9" * 400])
    msg = str(e.value)
    for part in ["privacy.delta = nan: must be a finite number", "privacy.clipping_norm = nan: must be a finite",
                 "privacy.target_epsilon = nan: must be a finite", "federation.max_value = nan: must be a finite",
                 "federation.rounds = 100000000000000000000: must be <= 1000000", "train.lr = inf: must be a finite",
                 "train.weight_decay = -inf: must be a finite", "federation.max_update_norm = nan: must be a finite",
                 "train.max_grad_norm = 999", "strategy.server_learning_rate = inf: must be a finite"]:
        assert part in msg, (part, msg)
    assert msg.startswith("10 problem(s)"), msg
    # a whole number without its own bound stops at 2**31 - 1; a list of them too
    with pytest.raises(FeditError, match="train.max_steps = 2147483648: must be <= 2147483647"):
        config.load(None, ["train.max_steps=2147483648"])
    with pytest.raises(FeditError, match=r"attack.clients = \[1, 9999999999\]: 9999999999 beyond"):
        config.load(None, ["attack.kind=scale", "attack.clients=[1, 9999999999]"])
    assert config.load(None, ["train.max_steps=2147483647"]).train.max_steps == 2147483647


def test_every_default_is_within_its_own_bounds():
    """A saved config writes every key: a default its own field refused would make every run unresumable."""
    import dataclasses

    from fedit.fields import check_value
    from fedit.strategies import STRATEGIES

    classes = {**config._sections(), **{f"strategy ({n})": s.Options for n, s in STRATEGIES.items()}}
    for section, cls in classes.items():
        for f in dataclasses.fields(cls):
            assert check_value(f"{section}.{f.name}", f, f.default)[1] is None, (section, f.name)


def test_scaffold_with_local_sgd_needs_a_rate_or_a_gradient_clip():
    """SGD's rate is derived from train.max_grad_norm when strategy.local_lr is 0: with both 0 there is none,
    and the config says so before any client trains."""
    from fedit.config import from_dict

    base = {"federation": {"strategy": "scaffold"}, "strategy": {"local_optimizer": "sgd"}}
    with pytest.raises(FeditError, match="set strategy.local_lr or train.max_grad_norm"):
        from_dict({**base, "train": {"max_grad_norm": 0.0}})
    assert from_dict({**base, "train": {"max_grad_norm": 0.0}, "strategy": {"local_optimizer": "sgd",
                                                                          "local_lr": 0.01}}).strategy.local_lr == 0.01
    assert from_dict(base).strategy.local_optimizer == "sgd"
