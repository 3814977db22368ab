"""Recipes: TOML files that name the data, model, scheme, optimizer, schedule and epochs.

A recipe is a small TOML file under ``lowbit/recipes/``. :func:`resolve` fills in every default,
applies ``key=value`` overrides (dotted keys, values parsed as TOML literals) and validates the
result, so the training engine only ever sees a complete, checked, plain-``dict`` config::

    cfg = resolve("mnist_mlp_w8a8", ["optim.lr=0.05", "epochs=3"])
    cfg["optim"]["lr"]   # 0.05

An unknown key or recipe name is a :class:`ConfigError` (a ``ValueError``) that suggests the
closest valid one. Tables named in :data:`FREE_TABLES` (``model.kwargs``, ``quant.overrides``,
``variants``) hold arbitrary keys that are passed on to the layer that reads them.

A recipe may define ``[variants.<label>]`` tables of overrides; ``lowbit train`` then trains one
run per variant and prints their results side by side (the default ``digits`` recipe compares
FP32 with W8A8 this way). ``variant=<label>`` selects a single one.
"""

from __future__ import annotations

import copy
import difflib
import os
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on 3.10
    import tomli as tomllib

__all__ = [
    "ConfigError",
    "Option",
    "OPTIONS",
    "FREE_TABLES",
    "DEFAULT_RECIPE",
    "list_recipes",
    "load_recipe",
    "resolve",
    "parse_override",
    "split_variants",
    "check_names",
    "get",
    "valid_keys",
]

DEFAULT_RECIPE = "digits"


class ConfigError(ValueError):
    """A recipe or an override is invalid (unknown key, wrong type, unknown recipe)."""


@dataclass(frozen=True)
class Option:
    """One config key: its default, accepted Python types, allowed values and a one-line doc."""

    default: Any
    types: tuple[type, ...]
    doc: str
    choices: tuple[Any, ...] | None = None
    minimum: float | None = None


def _opt(default, types, doc, choices=None, minimum=None) -> Option:
    if not isinstance(types, tuple):
        types = (types,)
    return Option(default, types, doc, tuple(choices) if choices else None, minimum)


# Every valid key of a resolved config, with its default. Dotted names are TOML tables.
OPTIONS: dict[str, Option] = {
    "description": _opt("", str, "one line shown by `lowbit recipes`"),
    "epochs": _opt(10, int, "number of training epochs", minimum=0),
    "seed": _opt(0, int, "seed for weights, data order and augmentation"),
    "out": _opt("", str, "output folder (default runs/<recipe>-<timestamp>)"),
    "device": _opt("auto", str, "auto | cpu | cuda | cuda:N"),
    "progress": _opt(True, bool, "tqdm progress bars (only shown on a terminal)"),
    "variant": _opt("", str, "train only this variant of a multi-variant recipe"),
    "data.name": _opt("digits", str, "dataset name for lowbit.data.get_dataset"),
    "data.root": _opt("", str, "data folder (default $LOWBIT_DATA, else ~/.cache/lowbit)"),
    "data.download": _opt(False, bool, "download the dataset when absent"),
    "data.batch_size": _opt(128, int, "training batch size (per process)", minimum=1),
    "data.eval_batch_size": _opt(512, int, "evaluation batch size", minimum=1),
    "data.augment": _opt("", str, "training augmentation: '' (none) or 'crop_flip'",
                         choices=("", "crop_flip")),
    "data.limit": _opt(0, int, "train on a seeded random subset of this size (0 = all)",
                       minimum=0),
    "data.eval_limit": _opt(0, int, "evaluate on a fixed random subset of N test items "
                            "(0 = all)", minimum=0),
    "data.eval_split": _opt("test", str, "split evaluated each epoch"),
    "data.drop_last": _opt(False, bool, "drop the last partial training batch"),
    "data.bptt": _opt(35, int, "language models: truncated back-propagation length", minimum=1),
    "data.train_split": _opt("train", str, "split used for training"),
    "model.name": _opt("small_cnn", str, "model name for lowbit.models.create"),
    "model.init": _opt("", str, "start training from these float weights: a lowbit checkpoint "
                       "(file or run folder) or a PyTorch state-dict file such as torchvision's "
                       "ResNet weights; loaded before quantization (QAT fine-tuning; the float "
                       "model of `lowbit ptq RECIPE`)"),
    "quant.scheme": _opt("fp32", str, "lowbit.nn.convert scheme: fp32, w8a8, w4a4, w1a1, ..."),
    "quant.first_last": _opt("", str, "precision of the first and last layer ('' = scheme's)"),
    "quant.norm": _opt("bn", str, "BatchNorm variant: bn (keep), range, l1, linf or shift "
                       "(shift-based BN, BinaryNet/QNN)",
                       choices=("bn", "range", "l1", "linf", "shift")),
    "quant.norm_bits": _opt(0, int, "run the BatchNorm variant in this many bits "
                            "(activations and gradients; 0 = float)", minimum=0),
    "optim.name": _opt("sgd", str, "optimizer", choices=("sgd", "adam", "adamax", "shift_adamax")),
    "optim.lr": _opt(0.1, (float, int), "learning rate", minimum=0.0),
    "optim.momentum": _opt(0.9, (float, int), "SGD momentum", minimum=0.0),
    "optim.nesterov": _opt(False, bool, "SGD Nesterov momentum"),
    "optim.weight_decay": _opt(0.0, (float, int), "L2 decay (never on BN params or biases)",
                               minimum=0.0),
    "optim.betas": _opt([0.9, 0.999], list, "Adam/AdaMax betas"),
    "optim.eps": _opt(1e-8, (float, int), "Adam/AdaMax epsilon", minimum=0.0),
    "optim.fused": _opt(True, bool, "SGD/Adam as torch's fused kernels (same update to the last bit, faster)"),
    "optim.master_dtype": _opt("fp32", str, "master weights kept in fp32, fp16 or bf16",
                               choices=("fp32", "fp16", "bf16")),
    "optim.master_rounding": _opt("stochastic", str, "rounding of 16-bit master weights",
                                  choices=("stochastic", "nearest")),
    "schedule.name": _opt("none", str, "learning-rate schedule",
                          choices=("none", "step", "multistep", "cosine", "exponential")),
    "schedule.warmup_epochs": _opt(0.0, (float, int), "linear warm-up length in epochs",
                                   minimum=0.0),
    "schedule.step_size": _opt(30, int, "step: decay every this many epochs", minimum=1),
    "schedule.milestones": _opt([], list, "multistep: epochs at which to decay"),
    "schedule.gamma": _opt(0.1, (float, int), "decay factor (step, multistep, exponential)",
                           minimum=0.0),
    "schedule.min_lr": _opt(0.0, (float, int), "cosine: final learning rate", minimum=0.0),
    "loss.name": _opt("cross_entropy", str, "training loss",
                      choices=("cross_entropy", "squared_hinge")),
    "loss.label_smoothing": _opt(0.0, (float, int), "cross-entropy label smoothing",
                                 minimum=0.0),
    "train.grad_clip": _opt(0.0, (float, int), "clip the global gradient norm (0 = off)",
                            minimum=0.0),
    "train.callbacks": _opt([], list, "names of after-step callbacks (lowbit.train.callbacks)"),
    "scaler.name": _opt("none", str, "loss scaler: none | enhanced (lowbit.train.loss_scaler)",
                        choices=("none", "enhanced")),
}

# Tables whose keys are free-form (passed through to the model builder, convert(), ...).
FREE_TABLES: dict[str, str] = {
    "model.kwargs": "keyword arguments for the model builder",
    "quant.overrides": "per-layer overrides passed to lowbit.nn.convert",
    "scaler.kwargs": "keyword arguments for the loss scaler",
    "variants": "named override sets: [variants.<label>] trains one run per label",
}

_SECTIONS = sorted({k.split(".")[0] for k in list(OPTIONS) + list(FREE_TABLES) if "." in k})


def valid_keys() -> list[str]:
    """All valid dotted keys (free tables included), sorted."""
    return sorted(list(OPTIONS) + list(FREE_TABLES))


def _suggest(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return f" Did you mean {close[0]!r}?" if close else ""


# ----------------------------------------------------------------------------- recipes
def _recipe_dir():
    return resources.files("lowbit") / "recipes"


def list_recipes() -> list[tuple[str, str]]:
    """``(name, description)`` of every shipped recipe, sorted by name."""
    out = []
    for entry in _recipe_dir().iterdir():
        if entry.name.endswith(".toml"):
            name = entry.name[: -len(".toml")]
            try:
                desc = tomllib.loads(entry.read_text(encoding="utf-8")).get("description", "")
            except tomllib.TOMLDecodeError as exc:
                desc = f"(unreadable recipe: {exc})"
            out.append((name, str(desc)))
    return sorted(out)


def load_recipe(name_or_path: str | Path) -> dict[str, Any]:
    """Read a recipe by shipped name (``"digits"``) or by path to a ``.toml`` file.

    Returns the raw table with a ``"recipe"`` key holding its name. Raises :class:`ConfigError`
    for an unknown name (suggesting the closest one) or a malformed file.
    """
    if not isinstance(name_or_path, (str, Path)):
        raise TypeError(f"recipe must be a name or a path, got {type(name_or_path).__name__}")
    text: str
    path = Path(name_or_path)
    text_name = str(name_or_path)
    if isinstance(name_or_path, Path) or text_name.endswith(".toml") or "/" in text_name \
            or os.sep in text_name:
        if not path.is_file():
            raise ConfigError(f"recipe file {str(path)!r} does not exist")
        text, label, name = path.read_text(encoding="utf-8"), str(path), path.stem
    else:
        name = str(name_or_path)
        entry = _recipe_dir() / f"{name}.toml"
        if not entry.is_file():
            names = [n for n, _ in list_recipes()]
            raise ConfigError(
                f"unknown recipe {name!r}.{_suggest(name, names)} "
                f"Available: {', '.join(names)} (see `lowbit recipes`)"
            )
        text, label = entry.read_text(encoding="utf-8"), f"recipe {name!r}"
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{label} is not valid TOML: {exc}") from None
    table.setdefault("recipe", name)
    table["_source"] = label
    return table


# --------------------------------------------------------------------------- overrides
_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*(\.[A-Za-z_][A-Za-z0-9_\-]*)*$")


def parse_value(text: str) -> Any:
    """Parse ``text`` as a TOML literal (``0.05``, ``true``, ``[1, 2]``, ``"s"``).

    Text that is not a TOML literal (``w8a8``, ``/data/x``) is taken as a plain string.
    """
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_override(item: str) -> tuple[str, Any]:
    """Split ``"optim.lr=0.05"`` into ``("optim.lr", 0.05)``."""
    if not isinstance(item, str) or "=" not in item:
        raise ConfigError(f"override {item!r} must look like key=value (e.g. optim.lr=0.05)")
    key, _, text = item.partition("=")
    key = key.strip()
    if not _KEY_RE.match(key):
        raise ConfigError(f"override {item!r}: {key!r} is not a valid dotted key")
    return key, parse_value(text.strip())


def _free_prefix(key: str) -> str | None:
    for table in FREE_TABLES:
        if key == table or key.startswith(table + "."):
            return table
    return None


def _check_key(key: str, where: str) -> None:
    if key in OPTIONS or _free_prefix(key):
        return
    raise ConfigError(f"unknown key {key!r} in {where}.{_suggest(key, valid_keys())}")


def _set(cfg: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = cfg
    for p in parts[:-1]:
        nxt = node.get(p)
        if not isinstance(nxt, dict):
            nxt = node[p] = {}
        node = nxt
    node[parts[-1]] = value


def get(cfg: Mapping[str, Any], key: str, default: Any = None) -> Any:
    """Read a dotted key from a nested config."""
    node: Any = cfg
    for p in key.split("."):
        if not isinstance(node, Mapping) or p not in node:
            return default
        node = node[p]
    return node


def _flatten(table: Mapping[str, Any], prefix: str = "") -> Iterable[tuple[str, Any]]:
    """Yield (dotted key, value) leaves; free tables are yielded whole."""
    for k, v in table.items():
        key = f"{prefix}{k}"
        if key in FREE_TABLES:
            if not isinstance(v, Mapping):
                raise ConfigError(f"{key!r} must be a table, got {v!r}")
            yield key, v
        elif isinstance(v, Mapping) and key not in OPTIONS:
            yield from _flatten(v, key + ".")
        else:
            yield key, v


def _type_words(types: tuple[type, ...]) -> str:
    if float in types:
        return "a number"
    words = {int: "an integer", str: "a string", bool: "true or false", list: "a list"}
    return " or ".join(words.get(t, t.__name__) for t in types)


def _validate(cfg: Mapping[str, Any], where: str) -> None:
    for key, opt in OPTIONS.items():
        value = get(cfg, key)
        if isinstance(value, bool) and bool not in opt.types:
            ok = False
        else:
            ok = isinstance(value, opt.types)
        if not ok:
            raise ConfigError(f"{key} must be {_type_words(opt.types)}, got {value!r} (in {where})")
        if opt.choices is not None and value not in opt.choices:
            raise ConfigError(
                f"{key} must be one of {', '.join(repr(c) for c in opt.choices)}, got {value!r}."
                f"{_suggest(str(value), [str(c) for c in opt.choices])} (in {where})"
            )
        if opt.minimum is not None and value < opt.minimum:
            raise ConfigError(f"{key} must be >= {opt.minimum}, got {value!r} (in {where})")
    betas = cfg["optim"]["betas"]
    if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
        raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {betas!r}")
    ms = cfg["schedule"]["milestones"]
    if not all(isinstance(m, int) and not isinstance(m, bool) and m > 0 for m in ms):
        raise ConfigError(f"schedule.milestones must be positive integers, got {ms!r}")
    cbs = cfg["train"]["callbacks"]
    if not all(isinstance(c, str) for c in cbs):
        raise ConfigError(f"train.callbacks must be a list of names, got {cbs!r}")
    for label, table in cfg.get("variants", {}).items():
        if not isinstance(table, Mapping):
            raise ConfigError(f"variants.{label} must be a table of overrides, got {table!r}")
        for key, _ in _flatten(table):
            if key in ("variants", "variant") or key.startswith("variants."):
                raise ConfigError(f"variants.{label} cannot set {key!r}")
            _check_key(key, f"variants.{label} ({where})")
    if cfg["variant"] and cfg.get("variants") and cfg["variant"] not in cfg["variants"]:
        labels = list(cfg.get("variants", {}))
        raise ConfigError(
            f"variant {cfg['variant']!r} is not defined.{_suggest(cfg['variant'], labels)} "
            f"Variants: {', '.join(labels) or '(none)'}"
        )


def _registered(kind: str) -> list[str] | None:
    """Valid names for ``data.name`` / ``model.name`` / ``quant.scheme`` (None if unknown)."""
    try:
        if kind == "data.name":
            from .data import DATASETS

            return list(DATASETS)
        if kind == "model.name":
            from .models import list_models

            return list_models()
        from .nn import list_schemes

        return list_schemes()
    except ImportError:  # that layer is not installed: its own call will raise later
        return None


def check_names(cfg: Mapping[str, Any], keys: Sequence[str] = ("data.name", "model.name",
                                                                "quant.scheme"),
                where: str | None = None) -> None:
    """Check that ``data.name``, ``model.name`` and ``quant.scheme`` are registered names.

    Kept out of :func:`resolve` so that a config can describe a model or data set that the
    caller builds itself.
    """
    if where is None:
        where = f"recipe {cfg.get('recipe', '')!r}" + (
            f", variant {cfg['variant']!r}" if cfg.get("variant") else "")
    for key in keys:
        value = get(cfg, key)
        valid = _registered(key)
        if valid is not None and value not in valid and not (key == "quant.scheme"
                                                             and value == ""):
            raise ConfigError(
                f"unknown {key} {value!r} (in {where}).{_suggest(value, valid)} "
                f"Valid: {', '.join(valid)}"
            )


def defaults() -> dict[str, Any]:
    """A complete config holding every default."""
    cfg: dict[str, Any] = {}
    for key, opt in OPTIONS.items():
        _set(cfg, key, copy.deepcopy(opt.default))
    for table in FREE_TABLES:
        _set(cfg, table, {})
    return cfg


def resolve(
    recipe: str | Path | Mapping[str, Any] | None = None,
    overrides: Sequence[str] | Mapping[str, Any] = (),
) -> dict[str, Any]:
    """The complete, validated config for ``recipe`` (name, path or table) plus ``overrides``.

    ``overrides`` is a list of ``"key=value"`` strings or ``(key, value)`` pairs, or a mapping
    of dotted keys to values. They are recorded in ``cfg["overrides"]``.
    ``recipe=None`` means the default recipe (``digits``).
    """
    if recipe is None:
        recipe = DEFAULT_RECIPE
    if isinstance(recipe, Mapping):
        table = copy.deepcopy(dict(recipe))
        where = str(table.pop("_source", "config"))
    else:
        table = load_recipe(recipe)
        where = table.pop("_source")
    name = str(table.pop("recipe", "custom"))
    previous = [list(kv) for kv in table.pop("overrides", [])]
    cfg = defaults()
    for key, value in _flatten(table):
        _check_key(key, where)
        _set(cfg, key, copy.deepcopy(value))
    if isinstance(overrides, Mapping):
        items = list(overrides.items())
    elif isinstance(overrides, (str, bytes)):
        raise TypeError("overrides must be a list of 'key=value' strings or a mapping")
    else:
        items = [parse_override(o) if isinstance(o, str) else _pair(o) for o in overrides]
    for key, value in items:
        _apply_override(cfg, key, value)
    _floats(cfg)
    _validate(cfg, f"{where} with overrides" if items else where)
    cfg["recipe"] = name
    cfg["overrides"] = previous + [[k, copy.deepcopy(v)] for k, v in items]
    return cfg


def _pair(item: Any) -> tuple[str, Any]:
    if isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str):
        return item[0], item[1]
    raise ConfigError(f"override {item!r} must be 'key=value' or a (key, value) pair")


def _apply_override(cfg: dict, key: str, value: Any) -> None:
    _check_key(key, "overrides")
    if isinstance(value, Mapping) and key not in FREE_TABLES and not _free_prefix(key):
        for sub, v in _flatten(value, key + "."):
            _check_key(sub, "overrides")
            _set(cfg, sub, copy.deepcopy(v))
    else:
        _set(cfg, key, copy.deepcopy(value))


def _floats(cfg: dict) -> None:
    # ints are accepted where floats are expected; store floats so checkpoints are uniform
    for key, opt in OPTIONS.items():
        if opt.types == (float, int):
            v = get(cfg, key)
            if isinstance(v, int) and not isinstance(v, bool):
                _set(cfg, key, float(v))


def split_variants(cfg: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """``[(label, config)]``: one resolved config per variant (or ``[("", cfg)]``).

    A variant's overrides are applied on top of the recipe, and the command-line overrides
    recorded in ``cfg["overrides"]`` on top of those; ``variant=<label>`` keeps one variant.
    """
    variants = cfg.get("variants") or {}
    base = copy.deepcopy(dict(cfg))
    base["variants"] = {}
    if not variants:
        return [("", base)]
    labels = [cfg["variant"]] if cfg.get("variant") else list(variants)
    if len(labels) > 1:
        varied = {k for table in variants.values() for k, _ in _flatten(table)}
        clash = [k for k, _ in cfg.get("overrides", []) if k in varied]
        if clash:
            raise ConfigError(
                f"{clash[0]} is what the variants of {cfg.get('recipe', 'this recipe')!r} vary "
                f"({', '.join(variants)}); overriding it would make them identical. Pick one "
                f"with variant=<label>"
            )
    out = []
    for label in labels:
        sub = copy.deepcopy(base)
        for key, value in _flatten(variants[label]):
            _set(sub, key, copy.deepcopy(value))
        for key, value in cfg.get("overrides", []):
            if key not in ("variant", "variants") and not key.startswith("variants."):
                _apply_override(sub, key, value)
        _floats(sub)
        sub["variant"] = label
        _validate(sub, f"variants.{label}")
        out.append((label, sub))
    return out
