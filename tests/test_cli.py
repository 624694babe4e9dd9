"""cli.py: flags from a config dataclass, what was typed, and argparse's errors as one line."""

from __future__ import annotations

import pytest

import pretrain
from tanggpt.cli import parse_config


def test_flags_typed_in_every_spelling_are_explicit():
    config, explicit = parse_config(pretrain.PretrainConfig, ["--n-layer=3", "--no-compile", "--lr", "1e-3"], "")
    assert (config.n_layer, config.compile, config.lr) == (3, False, 1e-3)
    assert explicit == {"n_layer", "compile", "lr"}
    config, explicit = parse_config(pretrain.PretrainConfig, [], "")
    assert explicit == set() and config == pretrain.PretrainConfig()


def test_an_abbreviated_flag_is_refused_not_guessed(capsys):
    """--n-lay would otherwise set n_layer without counting as typed, and --preset gpu would override it."""
    with pytest.raises(SystemExit) as exit_info:
        parse_config(pretrain.PretrainConfig, ["--n-lay", "3", "--preset", "gpu"], "")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: unrecognized arguments: --n-lay 3 (see --help)"


@pytest.mark.parametrize("argv, message", [(["--lr", "fast"], "argument --lr: invalid float value: 'fast'"),
                                           (["--preset", "tpu"], "argument --preset: invalid choice: 'tpu'")])
def test_argparse_errors_are_one_line(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(pretrain.PretrainConfig, argv, "")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err
