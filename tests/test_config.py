"""Config resolution: defaults < preset < YAML file < flags, and the option names config.py lists."""

from __future__ import annotations

from sheafprune import config
from sheafprune.config import resolve_config
from sheafprune.discovery.gates import GATES
from sheafprune.discovery.objective import FAITH_LOSSES


def test_config_names_the_gates_and_losses_the_code_has():
    """config.py lists the names without importing torch; they must be the implementations' keys."""
    assert set(config.GATES) == set(GATES) and set(config.FAITH_LOSSES) == set(FAITH_LOSSES)


def test_presets_sit_between_defaults_and_the_yaml_file_and_flags(tmp_path):
    default = resolve_config()
    assert default.searches and default.granularity == ("neuron", "head") and default.schedule == "joint"
    paper = resolve_config(preset="discogp")
    assert (paper.schedule, paper.granularity, paper.searches) == ("staged", ("weight", "edge"), False)
    assert (paper.gate, paper.faith_loss, paper.init) == ("concrete", "ce", "constant")
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("preset: discogp\nsteps: 7\ngranularity: [weight]\n")
    from_yaml = resolve_config(yaml_path=yaml_file)
    assert (from_yaml.schedule, from_yaml.granularity, from_yaml.steps) == ("staged", ("weight",), 7)
    flagged = resolve_config(yaml_path=yaml_file, overrides={"steps": 9, "schedule": "joint", "target_density": "weight=0.1"},
                             preset="default")
    assert (flagged.schedule, flagged.granularity, flagged.steps) == ("joint", ("weight",), 9)
    assert "preset" not in flagged.to_dict()
