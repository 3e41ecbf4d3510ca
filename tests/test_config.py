from pathlib import Path

import pytest

from tumorseg_dist.config import ConfigError, load_toml, parse, save_toml


def test_defaults_and_flag_overrides():
    cfg, preset = parse(["--data", "/x", "--lr", "0.01", "--arch", "fpn", "--no-channels-last",
                         "--batch-size", "64", "--max-steps", "5"])
    assert preset is None
    assert cfg.data.path == Path("/x")
    assert cfg.optim.lr == 0.01 and cfg.model.arch == "fpn"
    assert cfg.train.channels_last is False and cfg.train.batch_size == 64 and cfg.train.max_steps == 5


def test_builtin_preset_applies_only_without_data_and_flags_still_win():
    cfg, preset = parse(["--device", "cpu", "--epochs", "2"])
    assert preset == "synthetic-cpu"
    assert cfg.model.encoder == "resnet18" and cfg.data.size == 128
    assert cfg.train.epochs == 2  # the flag beats the preset


def test_toml_recipe_then_flags(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('[model]\narch = "unetplusplus"\n[optim]\nlr = 0.5\n[train]\nepochs = 7\n')
    cfg, _ = parse(["--config", str(recipe), "--data", "/d", "--epochs", "9"])
    assert cfg.model.arch == "unetplusplus" and cfg.optim.lr == 0.5 and cfg.train.epochs == 9


def test_unknown_toml_key_is_named(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text("[optim]\nlearning_rate = 0.1\n")
    with pytest.raises(ConfigError, match="optim.learning_rate"):
        load_toml(recipe)
    recipe.write_text("[optimiser]\nlr = 0.1\n")
    with pytest.raises(ConfigError, match=r"\[optimiser\]"):
        load_toml(recipe)


def test_bad_toml_value_is_named(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('[model]\narch = "resnet"\n')
    with pytest.raises(ConfigError, match="model.arch"):
        load_toml(recipe)
    recipe.write_text('[train]\nepochs = "ten"\n')
    with pytest.raises(ConfigError, match="train.epochs"):
        load_toml(recipe)


def test_unknown_flag_is_an_error(capsys):
    with pytest.raises(SystemExit) as e:
        parse(["--data", "/d", "--learning-rate", "3"])
    assert e.value.code != 0
    assert "learning-rate" in capsys.readouterr().err


def test_missing_resume_path_is_an_error():
    with pytest.raises(ConfigError, match="no such checkpoint"):
        parse(["--data", "/d", "--resume", "/nonexistent/last.pt"])


def test_resolved_config_round_trips(tmp_path):
    cfg, _ = parse(["--data", "/d", "--lr", "0.02", "--mean", "0.3", "--std", "0.2"])
    save_toml(cfg, tmp_path / "config.toml")
    again = load_toml(tmp_path / "config.toml")
    assert again == cfg


def test_validation_messages():
    with pytest.raises(ConfigError, match="multiple of 32"):
        parse(["--data", "/d", "--size", "100"])
    with pytest.raises(ConfigError, match="batch-size"):
        parse(["--data", "/d", "--batch-size", "0"])


def test_user_errors_are_one_line_and_debug_gives_the_traceback(monkeypatch, capsys):
    from tumorseg_dist.cli import guarded

    def bad():
        raise ConfigError("recipes/x.toml: unknown key optim.lrr")

    assert guarded("train", bad) == 2
    assert capsys.readouterr().err.strip() == "train: error: recipes/x.toml: unknown key optim.lrr"
    monkeypatch.setenv("TUMORSEG_DEBUG", "1")
    with pytest.raises(ConfigError):
        guarded("train", bad)


def test_weights_only_needs_a_checkpoint_path(tmp_path):
    with pytest.raises(ConfigError, match="--weights-only needs --resume PATH"):
        parse(["--data", "/d", "--weights-only"])
    ckpt = tmp_path / "last.pt"
    ckpt.write_bytes(b"")
    cfg, _ = parse(["--data", "/d", "--resume", str(ckpt), "--weights-only"])
    assert cfg.train.weights_only and cfg.train.resume == str(ckpt)


def test_every_setting_a_resume_may_change_is_a_real_field_with_its_flag():
    """A typo in MAY_CHANGE_ON_RESUME would freeze the setting it meant to free."""
    import dataclasses
    from tumorseg_dist.config import MAY_CHANGE_ON_RESUME, RESUME_MECHANICS, Config, flag_name
    fields = {f"{g.name}.{f.name}" for g in dataclasses.fields(Config)
              for f in dataclasses.fields(getattr(Config(), g.name))}
    assert MAY_CHANGE_ON_RESUME <= fields and RESUME_MECHANICS <= fields
    assert flag_name("data", "path") == "--data" and flag_name("train", "log_every") == "--log-every"


def test_augmentation_fields_are_declared_once_and_unset_means_the_preset():
    import dataclasses

    from tumorseg_dist.config import AugmentConfig
    from tumorseg_dist.data.augment import PRESETS, AugmentParams, resolve
    declared = [f.name for f in dataclasses.fields(AugmentConfig) if f.name != "augment"]
    assert [f.name for f in dataclasses.fields(AugmentParams)] == declared
    for name, preset in PRESETS.items():
        assert resolve(AugmentConfig(augment=name)) == preset
    cfg, _ = parse(["--data", "/d", "--augment", "light", "--gamma", "0.25", "--gamma-p", "1"])
    p = resolve(cfg.augment)
    assert (p.flip_p, p.gamma, p.gamma_p, p.noise) == (0.5, 0.25, 1.0, 0.0)


def test_augment_overrides_round_trip_and_old_minus_one_configs_still_load(tmp_path):
    from tumorseg_dist.config import to_dict
    cfg, _ = parse(["--data", "/d", "--noise", "0.01"])
    save_toml(cfg, tmp_path / "config.toml")
    assert to_dict(cfg)["augment"] == {"augment": "standard", "noise": 0.01}
    assert load_toml(tmp_path / "config.toml") == cfg
    # A run written while -1 meant "the preset's" resumes and reruns with the same settings.
    old = tmp_path / "old.toml"
    old.write_text('[data]\npath = "/d"\n[augment]\naugment = "standard"\nflip_p = -1.0\nnoise = 0.01\n')
    assert load_toml(old) == cfg


def test_augment_help_says_the_preset_is_the_default(capsys):
    with pytest.raises(SystemExit) as e:
        parse(["--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.replace("│", " ").split())
    assert "--flip-p FLOAT Probability of each of horizontal and vertical flip. (default: the preset's)" in out
