"""Config resolution: defaults < preset < YAML file < flags, and the option names config.py lists."""

from __future__ import annotations

import pytest
import torch

from sheafprune.config import RECIPES, resolve_config
from sheafprune.discovery.gates import GATES
from sheafprune.discovery.masks import rank_group
from sheafprune.discovery.objective import FAITH_LOSSES
from sheafprune.discovery.schedule import attribution_init
from sheafprune.masked import masked_forward
from sheafprune.models import tiny_model
from sheafprune.arch import view_of


@pytest.mark.parametrize("name", list(RECIPES))
def test_every_recipe_names_what_the_code_has(name):
    """config.py names each recipe's settings without importing torch; each must be one the code implements."""
    r = RECIPES[name]
    assert r.gate in GATES and r.faith_loss in FAITH_LOSSES, r
    assert rank_group("w/q/0", r.rank_within) in ("weight", "w/q/0"), r
    view = view_of(tiny_model("gpt2"))
    masked_forward(view, torch.zeros(1, 3, dtype=torch.long), edge_grad=r.edge_grad)  # raises on an unknown name
    targets = {"target_density": "weight=0.1"} if r.schedule == "joint" else {}
    assert attribution_init(resolve_config(overrides={"recipe": name, **targets})) == (r.init == "attribution")
    assert r.init in ("constant", "attribution") and 0 < r.noise_final <= r.noise_start <= 1 and r.init_spread > 0


def test_presets_sit_between_defaults_and_the_yaml_file_and_flags(tmp_path):
    default = resolve_config()
    assert default.searches and default.granularity == ("neuron", "head") and default.schedule == "joint"
    paper = resolve_config(preset="discogp")
    assert (paper.schedule, paper.granularity, paper.searches) == ("staged", ("weight", "edge"), False)
    recipe = paper.recipe_settings
    assert (paper.recipe, recipe.gate, recipe.faith_loss, recipe.init) == ("discogp", "concrete", "ce", "constant")
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("preset: discogp\nsteps: 7\ngranularity: [weight]\n")
    from_yaml = resolve_config(yaml_path=yaml_file)
    assert (from_yaml.schedule, from_yaml.granularity, from_yaml.steps) == ("staged", ("weight",), 7)
    flagged = resolve_config(yaml_path=yaml_file, overrides={"steps": 9, "recipe": "joint", "target_density": "weight=0.1"},
                             preset="default")
    assert (flagged.schedule, flagged.granularity, flagged.steps) == ("joint", ("weight",), 9)
    assert "preset" not in flagged.to_dict()
