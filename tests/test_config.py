"""Config: recipes load, overrides apply, and bad input fails naming the key."""

import pytest

from vits_ray.config import ConfigError, load_config, parse_override


def test_reference_recipe_matches_the_reference_run():
    cfg = load_config("bn_bd_vits")
    assert cfg.audio.sample_rate == 22050
    assert (cfg.optim.lr_gen, cfg.optim.lr_disc) == (2e-4, 2e-4)
    assert cfg.optim.betas == (0.8, 0.99)
    assert cfg.optim.lr_gamma == 0.999875
    assert cfg.train.seed == 54321
    assert cfg.train.save_step == 500
    assert cfg.model.hidden_channels == 192


def test_tiny_recipe_is_a_delta_over_the_reference():
    cfg = load_config("tiny")
    assert cfg.model.hidden_channels == 32
    assert cfg.train.seed == 54321  # inherited
    assert cfg.audio.hop_length == cfg.model.upsample_factor()


def test_override_applies_with_toml_values():
    cfg = load_config("tiny", ["optim.lr_gen=1e-4", "model.upsample_rates_decoder=[8, 8, 4]",
                               "optim.lr_schedule=cosine", "train.keep_step=true"])
    assert cfg.optim.lr_gen == 1e-4
    assert cfg.optim.lr_schedule == "cosine"
    assert cfg.train.keep_step is True


def test_unknown_key_names_the_key_and_the_allowed_ones():
    with pytest.raises(ConfigError, match=r"optim\.lr_gne: unknown key.*lr_gen"):
        load_config("tiny", ["optim.lr_gne=1e-4"])


def test_unknown_section_is_rejected():
    with pytest.raises(ConfigError, match="optimizer: unknown section"):
        load_config("tiny", ["optimizer.lr=1"])


def test_wrong_type_is_rejected():
    with pytest.raises(ConfigError, match=r"train\.save_step: expected int"):
        load_config("tiny", ["train.save_step=often"])
    with pytest.raises(ConfigError, match=r"train\.keep_step: expected bool"):
        load_config("tiny", ["train.keep_step=1"])


def test_out_of_range_value_is_rejected():
    with pytest.raises(ConfigError, match=r"optim\.lr_gen: must be in \(0, 1\)"):
        load_config("tiny", ["optim.lr_gen=3.0"])


def test_choice_lists_the_allowed_values():
    with pytest.raises(ConfigError, match="allowed values: 'exponential'"):
        load_config("tiny", ["optim.lr_schedule=linear"])


def test_cross_field_check_names_the_key():
    with pytest.raises(ConfigError, match="must equal audio.hop_length"):
        load_config("tiny", ["audio.hop_length=200"])


def test_malformed_override():
    with pytest.raises(ConfigError, match="expected section.key=value"):
        parse_override("lr=1")


def test_missing_recipe_lists_bundled_ones():
    with pytest.raises(ConfigError, match="bundled recipes: bn_bd_vits, tiny"):
        load_config("nope")


def test_printed_config_round_trips(tmp_path):
    cfg = load_config("tiny", ["optim.lr_gen=1e-4"])
    path = tmp_path / "resolved.toml"
    path.write_text(cfg.to_toml())
    assert load_config(path) == cfg


def test_cli_config_show_and_bad_key(tmp_path):
    from click.testing import CliRunner

    from vits_ray.cli import main

    ok = CliRunner().invoke(main, ["config", "show", "--config", "tiny", "--set", "train.seed=7"])
    assert ok.exit_code == 0 and "seed = 7" in ok.output
    bad = CliRunner().invoke(main, ["config", "show", "--set", "train.sead=7"])
    assert bad.exit_code != 0 and "train.sead" in bad.output
