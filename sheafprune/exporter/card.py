"""The export folder's README.md: what the model does, how good and how small it is, how to load it."""

from __future__ import annotations

from typing import Any


def _num(x: Any, fmt: str) -> str:
    return format(x, fmt) if isinstance(x, (int, float)) else "n/a"


def model_card(meta: dict[str, Any], info: dict[str, Any], formats: list[str]) -> str:
    m = meta.get("metrics", {})
    density = ", ".join(f"{k} {v:.2%}" for k, v in meta.get("density", {}).items()) or "n/a"
    model = meta.get("model", {}).get("name", "?")
    lines = [
        "---",
        "library_name: transformers",
        "tags: [sheafprune, pruning, sheaf]",
        "---",
    ]
    if info.get("not_kept"):
        lines += [f"> **Warning: this model does not keep its task.** It misses the floor of {info['keep']:g} x the "
                  f"full model's accuracy: {info['not_kept']}. Do not ship it as a model of this task.", ""]
    lines += [
        f"# {model} sheaf for `{meta.get('task', '?')}`",
        "",
        f"A task-specific sub-network of `{model}` found by sheafprune (DiscoGP-style joint weight/edge "
        "pruning) and physically compacted: pruned heads, neurons and layers are gone, and every kept "
        "reader reads only its kept writers, so this model computes exactly what the sheaf computes "
        f"(max |logit difference| to the masked model {info['max_abs_diff']:.2g} on held-out prompts).",
        "",
        "| | value |",
        "|---|---|",
        f"| task | `{meta.get('task', '?')}` |",
        f"| granularity | {', '.join(meta.get('granularity', []))} |",
        f"| kept (density) | {density} |",
        f"| accuracy full / sheaf / complement ({m.get('split', 'test')}, n={m.get('n', '?')}) | "
        f"{_num(m.get('full_accuracy'), '.3f')} / {_num(m.get('sheaf_accuracy'), '.3f')} / "
        f"{_num(m.get('complement_accuracy'), '.3f')} |",
        f"| parameters | {info['params']:,} of {info['params_original']:,} "
        f"({info['params'] / info['params_original']:.1%}) |",
        f"| bytes (fp32 weights) | {info['bytes']:,} of {info['bytes_original']:,} |",
        f"| heads / neurons / layers removed | {info['heads_removed']:.1%} / {info['neurons_removed']:.1%} / "
        f"{info['layers_removed']:.1%} |",
        f"| zeros inside kept tensors | {info['zero_share']:.1%} |",
        f"| files | {', '.join(formats)} |",
    ]
    if "safetensors" in formats:
        lines += _load_section()
    if "onnx" in formats:
        lines += ["", "`model.onnx`: inputs `input_ids`, `attention_mask` (int64, dynamic batch and sequence), "
                  "output `logits`; checked against torch with onnxruntime "
                  f"(max difference {_num(info.get('max_abs_diff_onnx'), '.2g')})."]
    lines += ["", "The source sheaf (mask logits, training curve) is in `sheaf/`; its metadata and these export "
              "figures are in `sheaf.json`.", ""]
    return "\n".join(lines)


def _load_section() -> list[str]:
    return [
        "",
        "## Load",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast",
        'model = AutoModelForCausalLM.from_pretrained("PATH", trust_remote_code=True)  # no sheafprune needed',
        'tokenizer = PreTrainedTokenizerFast.from_pretrained("PATH", padding_side="left")  # runs no custom code',
        "# or, with sheafprune installed: from sheafprune.exporter import load; model = load(\"PATH\")",
        "```",
        "",
        "`modeling_sheaf.py` (torch + transformers only) defines the architecture. `generate()` works, with a KV "
        "cache (`use_cache=False` turns it off). Positions count only real tokens: pad on the left. "
        "`AutoTokenizer` reads config.json, which names `modeling_sheaf.py`: it needs `trust_remote_code=True`.",
    ]
