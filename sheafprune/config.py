"""Discovery options: one frozen dataclass is the only home of defaults; defaults < YAML < CLI.

Unknown keys and out-of-range values are UserErrors. The resolved config is saved in every sheaf.json.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import yaml

from .errors import UserError

GRANULARITIES = ("weight", "neuron", "head", "edge")


@dataclass(frozen=True)
class Recipe:
    """How target mode trains the masks, beyond what it always does (docs/target-mode.md).

    schedule: "joint" (all mask types together, nsgd, top-k on a ramp to the targets) | "staged" (DiscoGP's: weights,
        then edges with the weight masks frozen and applied, under the paper's sparsity schedules, with AdamW).
    gate: "concrete" (DiscoGP's straight-through binary concrete) | "sigmoid" (noise-free: the mask is
        sigmoid(logit / s), s the noise scale acting as a temperature; discovery/gates.py).
    faith_loss: "ce" (DiscoGP's CE over the candidates) | "margin" (minus the right answer's logit margin over the
        others: it does not saturate on a sheaf surer than the full model; discovery/objective.py).
    edge_grad: what the edge masks' straight-through estimator uses for dL/dmask: "gradient", autograd's, or
        "secant", the loss change of flipping the edge taken exactly through its reader's norm (stack.flip_effects):
        a writer that dominates its reader's input has a gradient of ~0 at mask 1 yet breaks the reader.
    init: "constant" (DiscoGP's N(1, 0.01)) | "attribution" (logits spread over 1 +- init_spread by the rank of each
        entry's |dLoss/dmask| on the full model, discovery/attribution.py).
    noise_start, noise_final: the gate's noise scale, annealed over the joint schedule's ramp (1 = DiscoGP's).
    rank_within: where the attribution init ranks and nsgd takes its gradient RMS: over each mask "type", or within
        each "tensor" (one weight matrix, one reader group of edges).
    """

    schedule: str
    gate: str
    faith_loss: str
    edge_grad: str
    init: str
    init_spread: float
    noise_start: float
    noise_final: float
    rank_within: str


# How target mode trains: one joint recipe, and DiscoGP's own to reproduce the paper. Every other setting of these
# lost on IOI or anaphor at 5% of the weights and 5% of the edges on SmolLM2 (docs/weight-edge-experiments.md), so
# they are not options; DiscoGP's concrete gate and CE in the joint schedule lost IOI (chance) and anaphor alike,
# where the joint recipe below keeps IOI.
RECIPES: dict[str, Recipe] = {
    # Noise-free, so an entry fades out over several steps and the loss sees what losing it costs: SmolLM2 breaks on
    # IOI once a random 7% of its weights or edges is gone, which the concrete gate samples at every step.
    "joint": Recipe(schedule="joint", gate="sigmoid", faith_loss="margin", edge_grad="secant", init="attribution",
                    init_spread=2.0, noise_start=0.5, noise_final=0.02, rank_within="tensor"),
    # DiscoGP's: staged, its concrete gate at noise scale 1, CE, constant initial logits.
    "discogp": Recipe(schedule="staged", gate="concrete", faith_loss="ce", edge_grad="gradient", init="constant",
                      init_spread=1.0, noise_start=1.0, noise_final=1.0, rank_within="type"),
}

# Named starting points: defaults < preset < YAML file < flags. "default" is the keep search (the smallest sheaf of
# neurons and heads that keeps the task); "discogp" is DiscoGP's own recipe on its own granularity, weights and edges.
PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "discogp": {"recipe": "discogp", "granularity": ("weight", "edge")},
}

# Options that take one of a few names, with the names they take.
# Arithmetic of the target-mode training passes (discovery/step.py): fp32, or bf16 autocast (about a fifth less time
# a step on an AMX CPU, but on SmolLM2/IOI with the joint recipe it lost the 5%/5% sheaf that fp32 keeps:
# docs/step-cost.md). Evaluations, and so every sheaf judged or kept, are always fp32.
PRECISIONS = ("fp32", "bf16")
_CHOICES = {"recipe": tuple(RECIPES), "precision": PRECISIONS}
_FLOATS = ("keep", "lr")


@dataclass(frozen=True)
class DiscoverConfig:
    model: str = "smollm2-135m"
    task: str = "ioi"
    granularity: tuple[str, ...] = ("neuron", "head")
    # Kept fraction to reach per mask type; a type without a target is only pushed by the sparsity loss. Empty (the
    # default): the keep search (search.py) finds the smallest sheaf of neurons and heads that keeps the task.
    target_density: Mapping[str, float] = field(default_factory=dict)
    # The floor: a sheaf keeps the task if its accuracy (and answer-balanced accuracy, where answers are skewed) is at
    # least `keep` x the full model's. The keep search judges it on dev + select; export checks it on test.
    keep: float = 0.95
    # With density targets: how the masks train (RECIPES above; cfg.recipe_settings).
    recipe: str = "joint"
    steps: int = 300  # optimizer steps (each stage gets all of them in the staged schedule)
    batch_size: int = 32  # global batch, split across processes
    # Learning rate of the mask logits. In the joint schedule it decays linearly after the density ramp to a tenth
    # by the last step (schedule.lr_at), so the sheaf stops churning at the target.
    lr: float = 0.1
    precision: str = "fp32"  # of the training passes in target mode (PRECISIONS above)
    n_items: Optional[int] = None  # task size where the task generates items (ioi)
    eval_every: int = 10
    checkpoint_every: int = 50
    early_stop: bool = True  # stop once every target is met and dev accuracy holds
    max_minutes: Optional[float] = 20.0  # wall-clock budget (2-core CPU default); the run evaluates and stops when it is spent
    # Under several processes: each rank holds only its rows of the weight-mask logits, their gradients and AdamW
    # state, and of the maskable weights (shard.py); the result equals the unsharded run's. One process: one shard.
    shard_masks: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.target_density, Mapping):
            raise UserError(f"target_density must map mask types to densities, e.g. weight=0.03,edge=0.03, "
                            f"got {self.target_density!r}")
        bad = [str(g) for g in self.granularity if g not in GRANULARITIES]
        if bad or not self.granularity:
            raise UserError(f"unknown granularity {','.join(bad) or '(empty)'}; use any of {','.join(GRANULARITIES)}")
        for t, d in self.target_density.items():
            if t not in self.granularity:
                raise UserError(f"--target-density names {t!r}, which is not in --granularity {','.join(self.granularity)}")
            if isinstance(d, bool) or not isinstance(d, (int, float)) or not (0.0 < d <= 1.0):
                raise UserError(f"target density {t}={d} is outside (0, 1]; give the kept fraction, e.g. {t}=0.05")
        for name in ("shard_masks", "early_stop"):
            if not isinstance(getattr(self, name), bool):
                raise UserError(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name, allowed in _CHOICES.items():
            if getattr(self, name) not in allowed:
                raise UserError(f"unknown {name} {getattr(self, name)!r}; use one of {', '.join(allowed)}")
        for name in ("steps", "batch_size", "eval_every", "checkpoint_every", "seed", "n_items"):
            value = getattr(self, name)
            if value is None and name == "n_items":
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise UserError(f"--{name.replace('_', '-')} must be an integer, got {value!r}")
            if value <= 0 and name != "seed":
                raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
        # `not x > 0`, not `x <= 0`: NaN is neither, and a NaN learning rate or temperature poisons the run.
        for name in _FLOATS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise UserError(f"--{name.replace('_', '-')} must be a finite number, got {value!r}")
        if not self.lr > 0:
            raise UserError(f"--lr must be positive, got {self.lr}")
        if self.max_minutes is not None and (isinstance(self.max_minutes, bool) or not isinstance(
                self.max_minutes, (int, float)) or not self.max_minutes > 0):
            raise UserError(f"--max-minutes must be a positive number, got {self.max_minutes!r}")
        if not 0.0 < self.keep <= 1.0:
            raise UserError(f"--keep must be in (0, 1], the share of the full model's accuracy to keep; got {self.keep}")
        if self.searches and set(self.granularity) - {"neuron", "head"}:
            raise UserError(f"--granularity {','.join(self.granularity)} needs --target-density (e.g. weight=0.05,"
                            "edge=0.05): without targets the keep search learns neuron and head masks")

    @property
    def recipe_settings(self) -> Recipe:
        return RECIPES[self.recipe]

    @property
    def schedule(self) -> str:
        return self.recipe_settings.schedule

    @property
    def searches(self) -> bool:
        """No density targets (and not DiscoGP's staged recipe): the keep search finds the density."""
        return not self.target_density and self.schedule == "joint"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["granularity"] = list(self.granularity)
        d["target_density"] = dict(self.target_density)
        return d


def parse_density(text: str) -> dict[str, float]:
    """'weight=0.03,edge=0.03' -> {'weight': 0.03, 'edge': 0.03}."""
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        try:
            if not sep:
                raise ValueError
            out[name.strip()] = float(value)
        except ValueError:
            raise UserError(f"bad --target-density {text!r}; write it as weight=0.03,edge=0.03") from None
    return out


def resolve_config(*, yaml_path: Optional[Path] = None, overrides: Optional[Mapping[str, Any]] = None,
                   preset: Optional[str] = None) -> DiscoverConfig:
    """defaults < preset (`preset`, else the YAML file's `preset` key, else "default") < YAML file < explicit
    overrides (from the CLI); unknown keys and presets raise."""
    values: dict[str, Any] = {}
    if yaml_path is not None:
        try:
            loaded = yaml.safe_load(Path(yaml_path).read_text()) or {}
        except FileNotFoundError:
            raise UserError(f"config file {yaml_path} does not exist") from None
        except yaml.YAMLError as e:
            raise UserError(f"config file {yaml_path} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(loaded, dict):
            raise UserError(f"config file {yaml_path} must be a mapping of option: value")
        values.update(loaded)
    named_in_file = values.pop("preset", None)
    preset = preset or named_in_file or "default"
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; use one of {', '.join(PRESETS)}")
    values = {**PRESETS[preset], **values}
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    known = {f.name for f in dataclasses.fields(DiscoverConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserError(f"unknown config key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    if isinstance(values.get("granularity"), str):
        values["granularity"] = tuple(g.strip() for g in values["granularity"].split(",") if g.strip())
    elif isinstance(values.get("granularity"), (list, tuple)):
        values["granularity"] = tuple(values["granularity"])
    elif "granularity" in values:
        raise UserError(f"granularity must be a list such as weight,edge, got {values['granularity']!r}")
    for name in _FLOATS:  # YAML 1.1 reads 1e-3 (no dot) as a string
        if isinstance(values.get(name), str):
            try:
                values[name] = float(values[name])
            except ValueError:
                raise UserError(f"--{name.replace('_', '-')} must be a number, got {values[name]!r}") from None
    if isinstance(values.get("target_density"), str):
        values["target_density"] = parse_density(values["target_density"])
    if values.get("target_density") and "granularity" not in values:
        values["granularity"] = tuple(t for t in GRANULARITIES if t in values["target_density"])
    try:
        cfg = DiscoverConfig(**values)
    except TypeError as e:
        raise UserError(f"bad config value: {e}") from None
    if cfg.precision != "fp32" and cfg.searches:
        raise UserError(f"--precision {cfg.precision} applies to training toward --target-density; the keep search "
                        "runs in fp32")
    if "recipe" in values and cfg.searches:
        raise UserError(f"--recipe {cfg.recipe} trains toward --target-density (e.g. weight=0.05,edge=0.05); without "
                        "targets the keep search runs, which has one way to train")
    return cfg
