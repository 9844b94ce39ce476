import pytest

from quicktrain import cli
from quicktrain.train import TrainConfig, load_recipe

RECIPE = """
dataset = "digits"
model = "mlp"

[budget]
epochs = 7
batch_size = 32

[precond]
precond = "kfac"
damping = 0.01
"""


def test_recipe_tables_flatten_into_config_fields(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text(RECIPE)
    settings = load_recipe(path)
    assert settings == {
        "dataset": "digits",
        "model": "mlp",
        "epochs": 7,
        "batch_size": 32,
        "precond": "kfac",
        "damping": 0.01,
    }
    TrainConfig(**settings)


def test_command_line_flags_override_the_recipe(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text(RECIPE)
    args = cli.parse_args(["train", "--recipe", str(path), "--epochs", "2", "--damping", "0.5"])
    config = cli.config_from_args(args)
    assert (config.epochs, config.damping, config.batch_size, config.model) == (2, 0.5, 32, "mlp")
    assert cli.config_from_args(cli.parse_args(["train"])).epochs == TrainConfig().epochs


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("epochz = 3", "unknown setting 'epochz'"),
        ("epochs = 3\n[budget]\nepochs = 4", "given twice"),
        ("epochs = ", "not valid TOML"),
    ],
)
def test_bad_recipes_say_what_is_wrong(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_recipe(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_recipe(tmp_path / "missing.toml")


def test_shipped_recipes_are_valid_configs():
    from pathlib import Path

    recipes = sorted((Path(__file__).parents[2] / "recipes").glob("*.toml"))
    assert len(recipes) >= 4
    for path in recipes:
        config = TrainConfig(**load_recipe(path))
        assert config.dataset == "fashion-mnist" and config.max_steps_per_epoch == 100


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("boost", "false", r"boost = 'false': expected a bool, got str \(write true or false, without quotes\)"),
        ("epochs", 1.5, "epochs = 1.5: expected an integer, got float"),
        ("epochs", True, "epochs = True: expected an integer, got bool"),
        ("lr", [0.1, 0.2], r"lr = \[0.1, 0.2\]: expected a number, got list"),
        ("lr", "0.1", "lr = '0.1': expected a number, got str"),
        ("classes", 3, "classes = 3: expected a string or none, got int"),
        ("epochs", None, "epochs = None: expected an integer"),
        ("plt_end", 1.5, r"plt_end = 1.5: must be a finite number >= 0 and <= 1"),
        ("model", " ", "model = ' ': must not be empty"),
    ],
)
def test_config_fields_are_type_and_range_checked(name, value, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{name: value})


def test_integers_are_accepted_for_float_fields_and_stored_as_floats():
    config = TrainConfig(lr=1, weight_decay=0)
    assert isinstance(config.lr, float) and config.lr == 1.0 and isinstance(config.weight_decay, float)
