"""Training recipes: named TrainConfig presets, shipped as YAML files beside this module.

A TrainConfig is built in layers, each over the one below: recipe < `--config` file < flags.
`kvdistill train --recipe kava`, the Python API and `kvdistill compare` build it the same
way, with `train_config`:

    from kvdistill.train.recipes import load_recipe, train_config
    load_recipe("kava")  # {"mode": "latent", "lora_r": 128, ...}
    cfg = train_config({"store": "s.zarr", "student": {"name_or_path": "S"}, "out": "runs/latent", "mode": "latent"})

Without a recipe named, mode latent takes `kava` and mode cot `default` (TrainConfig's own
defaults). A field a higher layer sets replaces the recipe's value, and one that the recipe's
field stands in for drops it: --warmup-steps given drops kava's warmup_ratio."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from kvdistill.schemas import ConfigError, TrainConfig, build
from kvdistill.schemas.base import load_yaml, read_config

__all__ = ["RECIPE_DIR", "recipe_names", "load_recipe", "default_recipe", "train_config"]

RECIPE_DIR = Path(__file__).parent


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def load_recipe(name: str) -> dict[str, Any]:
    """The TrainConfig fields a recipe sets (a partial config: no store, student or out)."""
    path = RECIPE_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"recipe {name!r} does not exist; the recipes are {recipe_names()} (files in {RECIPE_DIR})")
    data = load_yaml(path.read_text()) or {}
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    if not isinstance(data, dict) or set(data) - known:
        raise ConfigError(
            f"recipe {path}: a mapping of TrainConfig fields, got unknown field(s)"
            f" {sorted(set(data) - known) if isinstance(data, dict) else data!r}"
        )
    return data


def default_recipe(mode: str | None) -> str:
    """The recipe of a mode when none is named: the paper's for KaVa latent mode."""
    return "kava" if mode == "latent" else "default"


def train_config(
    overrides: dict[str, Any] | None = None, *, recipe: str | None = None, config: str | Path | None = None
) -> TrainConfig:
    """recipe < the `config` file < `overrides` (dotted keys, e.g. "student.name_or_path"; None:
    not given). recipe None: default_recipe of the mode the file or the overrides set."""
    overrides = overrides or {}
    if recipe is None:
        mode = overrides.get("mode")
        if mode is None and config is not None:
            mode = read_config(config, TrainConfig).get("mode")
        recipe = default_recipe(mode)
    return build(TrainConfig, config, overrides, base=load_recipe(recipe))
