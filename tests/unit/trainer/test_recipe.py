"""The default recipe: what `rnn-trainer train` parses to with no tuning flags, per level."""

from __future__ import annotations

import pytest

from rnnserve.trainer.cli import build_parser, recurrent_train_config
from rnnserve.trainer.recipe import CHAR, WORD, average_from, recipe_for


def _parsed(*flags: str):
    argv = ["train", *flags]
    return build_parser(argv).parse_args(argv)


@pytest.mark.parametrize(("flags", "recipe"), [
    ((), CHAR), (("--level", "word"), WORD), (("--level=word",), WORD),
    (("--arch", "gru"), recipe_for("char", "gru")),
    (("--arch=gru", "--level", "word"), recipe_for("word", "gru")),
])  # fmt: skip
def test_no_tuning_flags_parse_to_the_level_recipe(flags: tuple[str, ...], recipe) -> None:
    args = _parsed(*flags)
    model = (args.layers, args.hidden, args.embed, args.dropout, args.weight_drop)
    assert model == (recipe.layers, recipe.hidden, recipe.embed, recipe.dropout,
                     recipe.weight_drop)  # fmt: skip
    cfg = recurrent_train_config(args)
    assert (cfg.epochs, cfg.num_steps, cfg.batch_size) == (
        recipe.epochs, recipe.num_steps, recipe.batch_size)  # fmt: skip
    assert (cfg.lr, cfg.lr_decay, cfg.sampling) == (recipe.lr, recipe.lr_decay, recipe.sampling)
    assert cfg.weight_decay == recipe.weight_decay
    assert (cfg.patience, cfg.time_budget) == (recipe.patience, recipe.time_budget)
    assert cfg.average_from == average_from(recipe.epochs, recipe.average_last) > 1
    cfg.validate()


def test_the_char_recipe_is_the_documented_one() -> None:
    """docs/trainer.md ("The default recipe") states these numbers; change both together."""
    assert (CHAR.hidden, CHAR.embed, CHAR.dropout) == (512, 64, 0.4)
    assert (CHAR.lr, CHAR.lr_decay, CHAR.average_last) == (0.005, 0.9, 0.5)
    assert CHAR.time_budget <= 540, "the recipe must leave time to export within 10 minutes"


def test_a_given_flag_wins_and_the_averaged_share_follows_epochs() -> None:
    args = _parsed("--hidden", "64", "--dropout", "0", "--epochs", "4", "--patience", "0")
    cfg = recurrent_train_config(args)
    assert (args.hidden, args.dropout, cfg.patience) == (64, 0.0, 0)
    assert cfg.epochs == 4 and cfg.average_from == 3  # the last half: epochs 3 and 4
    assert recurrent_train_config(_parsed("--average-from", "0")).average_from == 0
    assert recurrent_train_config(_parsed("--epochs", "1")).average_from == 1


def test_forecast_keeps_its_own_defaults() -> None:
    args = _parsed("--task", "forecast")
    assert (args.arch, args.epochs, args.hidden, args.lr, args.dropout) == (
        "gru", 300, None, 0.01, 0.0)  # fmt: skip
    assert args.patience == 10  # the forecast flag, not the recipe's


def test_average_from_takes_the_last_share_of_the_epochs() -> None:
    assert average_from(24, 0.5) == 13
    assert average_from(5, 0.5) == 3  # 2.5 epochs count as 3: epochs 3, 4, 5
    assert average_from(1, 0.5) == 1
    assert average_from(10, 0.0) == 0
    assert recipe_for("word") == WORD and recipe_for("char") == CHAR


def test_the_gru_changes_its_shape_learning_rate_and_regularisation() -> None:
    """docs/trainer.md states these numbers; change both together."""
    gru = recipe_for("char", "gru")
    assert (gru.dropout, gru.weight_drop, gru.lr, gru.lr_decay) == (0.2, 0.2, 0.003, 0.9)
    assert (gru.layers, gru.hidden) == (2, 320) and CHAR.layers == 1
    assert (gru.embed, gru.time_budget) == (CHAR.embed, CHAR.time_budget)
    assert recipe_for("char", "rnn") == CHAR
