"""Recipes and overrides (lowbit.config), and the real-data recipe runs (marked slow)."""

from __future__ import annotations

import json
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit import config as config_mod
from lowbit.config import ConfigError, list_recipes, parse_override, parse_value, resolve

RECIPES = [name for name, _ in list_recipes()]


def test_shipped_recipes():
    assert {"digits", "mnist_mlp_fp32", "mnist_mlp_w8a8", "cifar10_resnet20_fp32",
            "cifar10_resnet20_w8a8"} <= set(RECIPES)


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_resolves_and_builds(name):
    """Every recipe: one-line description, known data/model/scheme, model builds and converts."""
    from lowbit.train import Task, build_model

    cfg = resolve(name)
    desc = cfg["description"]
    assert 10 < len(desc) < 160 and "\n" not in desc
    channels = {"digits": 1, "mnist": 1, "cifar10": 3, "imagenet": 3}
    for label, sub in config_mod.split_variants(cfg):
        task = Task("classify", num_classes=10, in_channels=channels.get(sub["data"]["name"]))
        model = build_model(sub, task)
        scheme = sub["quant"]["scheme"]
        quantized = any(type(m).__name__.startswith("Q") for m in model.modules())
        assert quantized == (scheme != "fp32"), (name, label)
        norms = {type(m).__name__ for m in model.modules() if "BatchNorm" in type(m).__name__}
        if sub["quant"]["norm"] != "bn":
            prefix = {"range": "Range", "l1": "L1", "linf": "Linf"}[sub["quant"]["norm"]]
            assert norms and all(n.startswith(prefix) for n in norms), (name, label, norms)


def test_recipe_names_in_filenames_match_schemes():
    for name in RECIPES:
        for scheme in ("fp32", "w8a8"):
            if name.endswith("_" + scheme):
                assert resolve(name)["quant"]["scheme"] == scheme


def test_overrides_dotted_and_typed():
    cfg = resolve("mnist_mlp_w8a8", ["optim.lr=0.05", "epochs=3", "quant.scheme=w4a4",
                                     "schedule.milestones=[2, 4]", "data.augment='crop_flip'",
                                     "optim.nesterov=false", "model.kwargs.hidden=[64]"])
    assert cfg["optim"]["lr"] == 0.05 and cfg["epochs"] == 3
    assert cfg["quant"]["scheme"] == "w4a4" and cfg["schedule"]["milestones"] == [2, 4]
    assert cfg["data"]["augment"] == "crop_flip" and cfg["optim"]["nesterov"] is False
    assert cfg["model"]["kwargs"]["hidden"] == [64]
    assert cfg["model"]["kwargs"]["batchnorm"] is True  # the rest of the table is kept
    # an int where a float is expected is stored as float
    assert resolve("digits", ["optim.lr=1"])["optim"]["lr"] == 1.0
    assert isinstance(resolve("digits", ["optim.lr=1"])["optim"]["lr"], float)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lrr=0.1", "unknown key 'optim.lrr' in overrides. Did you mean 'optim.lr'?"),
        ("epoch=3", "Did you mean 'epochs'?"),
        ("schedul.name=cosine", "Did you mean 'schedule.name'?"),
        ("optim.name=sdg", "Did you mean 'sgd'?"),
        ("schedule.name=cosin", "Did you mean 'cosine'?"),
        ("epochs=2.5", "epochs must be an integer"),
        ("optim.nesterov=1", "optim.nesterov must be true or false"),
        ("optim.betas=[0.9]", "optim.betas must be two numbers"),
        ("data.batch_size=0", "data.batch_size must be >= 1"),
        ("model.name=resnet-20", "Did you mean 'resnet20'"),
        ("nokey", "must look like key=value"),
    ],
)
def test_bad_overrides_suggest(override, message):
    with pytest.raises(ConfigError) as exc:
        for _, sub in config_mod.split_variants(resolve("cifar10_resnet20_fp32", [override])):
            config_mod.check_names(sub)
    assert message in str(exc.value)


def test_unknown_recipe_suggests():
    with pytest.raises(ConfigError, match=r"unknown recipe 'mnist_mlp_w8'. Did you mean "
                                          r"'mnist_mlp_w8a8'\?"):
        resolve("mnist_mlp_w8")


def test_recipe_file_with_typo(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('description = "x"\n[optim]\nname = "sgd"\nlrate = 0.1\n')
    with pytest.raises(ConfigError, match=r"unknown key 'optim.lrate' in .*mine.toml"):
        resolve(str(path))
    path.write_text('description = "x"\n[optimizer]\nlr = 0.1\n')
    with pytest.raises(ConfigError, match=r"Did you mean 'optim.lr'"):
        resolve(str(path))
    path.write_text("description = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        resolve(str(path))
    with pytest.raises(ConfigError, match="does not exist"):
        resolve(str(tmp_path / "absent.toml"))


def test_recipe_file_by_path(tmp_path):
    path = tmp_path / "tiny.toml"
    path.write_text('description = "tiny"\nepochs = 1\n[model]\nname = "small_cnn"\n'
                    '[model.kwargs]\nwidth = 4\n')
    cfg = resolve(str(path), ["seed=3"])
    assert cfg["recipe"] == "tiny" and cfg["model"]["kwargs"] == {"width": 4}
    assert cfg["seed"] == 3 and cfg["overrides"] == [["seed", 3]]


def test_variants_split_and_select():
    runs = config_mod.split_variants(resolve("digits", ["epochs=1"]))
    assert [(label, c["quant"]["scheme"], c["epochs"]) for label, c in runs] == [
        ("fp32", "fp32", 1), ("w8a8", "w8a8", 1)]
    (only,) = config_mod.split_variants(resolve("digits", ["variant=w8a8"]))
    assert only[0] == "w8a8"
    with pytest.raises(ConfigError, match="variant 'w8' is not defined. Did you mean 'w8a8'"):
        resolve("digits", ["variant=w8"])
    with pytest.raises(ConfigError, match="what the variants of 'digits' vary"):
        config_mod.split_variants(resolve("digits", ["quant.scheme=w4a4"]))


def test_resolved_config_round_trips():
    cfg = resolve("cifar10_resnet20_w8a8", ["optim.lr=0.05"])
    again = resolve(cfg)
    assert again == cfg
    assert resolve(cfg, ["epochs=2"])["overrides"] == [["optim.lr", 0.05], ["epochs", 2]]


def test_every_option_documented():
    for key, opt in config_mod.OPTIONS.items():
        assert opt.doc and isinstance(opt.default, opt.types), key


# ---------------------------------------------------------------- TOML literal values
toml_scalars = st.one_of(
    st.integers(-10**12, 10**12),
    st.floats(allow_nan=False, allow_infinity=False, width=64),
    st.booleans(),
    st.text(alphabet=st.characters(codec="ascii", exclude_categories=("Cc",)), max_size=12),
)


def _literal(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, float):
        return repr(v)  # Python's shortest repr is a valid TOML float (1e-05, 2.5, -0.0)
    if isinstance(v, list):
        return "[" + ", ".join(_literal(x) for x in v) + "]"
    return str(v)


@given(st.one_of(toml_scalars, st.lists(st.integers(-1000, 1000), max_size=5)))
def test_parse_value_round_trips_toml_literals(v):
    assert parse_value(_literal(v)) == v


@settings(max_examples=40)
@given(st.from_regex(r"[a-z][a-z0-9_/\-]{0,10}", fullmatch=True))
def test_bare_words_are_strings(word):
    value = parse_value(word)
    if word in ("true", "false", "inf", "nan") or word.lstrip("-").isdigit():
        return
    assert value == word


def test_parse_override_splits_on_first_equals():
    assert parse_override("data.root=/a=b") == ("data.root", "/a=b")
    assert parse_override("quant.scheme=w8a8") == ("quant.scheme", "w8a8")
    with pytest.raises(ConfigError, match="not a valid dotted key"):
        parse_override("optim..lr=1")


# ----------------------------------------------------------------- real-data recipes
def _run(name, epochs, shared_datasets, tmp_path, extra=()):
    from lowbit.train import train

    t0 = time.perf_counter()
    res = train(name, [f"epochs={epochs}", f"data.root={shared_datasets}", "progress=false",
                       *extra], out_dir=tmp_path / name, log=print)
    return res, time.perf_counter() - t0


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mnist_mlp_fp32", "mnist_mlp_w8a8"])
def test_mnist_mlp_recipe(name, shared_datasets, tmp_path):
    """The full MNIST MLP recipe (10 epochs): at least 98 % test accuracy."""
    res, secs = _run(name, 10, shared_datasets, tmp_path)
    print(f"{name}: top-1 {res.final['val_top1']:.2f} % after 10 epochs in {secs:.0f} s")
    assert res.final["val_top1"] >= 98.0


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("name", ["cifar10_resnet20_fp32", "cifar10_resnet20_w8a8"])
def test_cifar10_resnet20_short(name, shared_datasets, tmp_path):
    """A short CIFAR-10 ResNet-20 run (2 epochs on 10,000 training images) learns: top-1 well
    above the 10 % chance level. The full recipe is 160 epochs (hours on 2 CPU cores)."""
    res, secs = _run(name, 2, shared_datasets, tmp_path, ["data.limit=10000"])
    print(f"{name}: top-1 {res.final['val_top1']:.2f} % after 2 short epochs in {secs:.0f} s")
    assert res.final["val_top1"] >= 30.0
