"""The export folder's README.md: what the model does, how good and how small it is, how to load it."""

from __future__ import annotations

from typing import Any

from .quantize import INT8_FILE, int8_warning


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
        f"| bytes ({_weights(info, formats)}) | {info['bytes']:,} of {info['bytes_original']:,} (fp32) |",
        f"| heads / neurons / layers removed | {info['heads_removed']:.1%} / {info['neurons_removed']:.1%} / "
        f"{info['layers_removed']:.1%} |",
        f"| zeros inside kept tensors | {info['zero_share']:.1%} |",
        f"| files | {', '.join(formats)} |",
    ]
    lines += _variants(info) + _files_table(info)
    if "safetensors" in formats:
        lines += _load_section()
    if "onnx" in formats:
        lines += ["", "`model.onnx`: inputs `input_ids`, `attention_mask` (int64, dynamic batch and sequence), "
                  "output `logits`; checked against torch with onnxruntime "
                  f"(max difference {_num(info.get('max_abs_diff_onnx'), '.2g')})."]
    if "bytes_int8" in info:
        lines += ["", f"`{INT8_FILE}`: the same graph with its weights dynamically quantized to 8 bits (onnxruntime "
                  "`quantize_dynamic`, QUInt8); same inputs and output; max |logit difference| to `model.onnx` "
                  f"{_num(info.get('max_abs_diff_int8'), '.2g')} on the held-out prompts."]
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


def _weights(info: dict[str, Any], formats: list[str]) -> str:
    return f"model.safetensors, {info.get('dtype', 'float32')}" if "safetensors" in formats else "fp32 weights"


def _variants(info: dict[str, Any]) -> list[str]:
    """What --dtype, --vocab task and --quantize changed, each after the fp32 exactness check."""
    lines = []
    if info.get("dtype", "float32") != "float32":
        lines += ["", f"`model.safetensors` holds {info['dtype']} weights, cast after the fp32 check above; "
                  f"config.json says `dtype: {info['dtype']}`, so it loads in that dtype. The cast's own max |logit "
                  f"difference| to the fp32 model is {info['max_abs_diff_dtype']:.2g} on the held-out prompts."]
    if info.get("vocab") == "task":
        lines += ["", f"Task vocabulary: embedding rows are kept for {info['vocab_kept']:,} of {info['vocab_size']:,} "
                  "token ids (every token of the task's items, all splits, and the special tokens), plus one fallback "
                  f"row (row {info['vocab_fallback_row']}, the mean embedding over the full vocabulary) that every other "
                  "input id reads. Logits stay over the full vocabulary: an id that is not kept gets the dtype's lowest "
                  "float. Kept logits equal the full-vocabulary model's (max difference "
                  f"{_num(info.get('max_abs_diff_vocab'), '.2g')}); probabilities are normalized over the kept tokens."]
    warning = int8_warning(info)
    if warning:
        lines += ["", f"> **Warning:** {warning}."]
    return lines


def _files_table(info: dict[str, Any]) -> list[str]:
    rows = info.get("files") or []
    if not rows:
        return []
    b, t = info["latency_batch"]
    lines = ["", f"| file | dtype | bytes | CPU latency (batch {b} x {t} tokens of the task's prompts) | "
             f"accuracy ({info['test_split']}, n={info['test_n']}) |", "|---|---|---|---|---|"]
    lines += [f"| `{r['file']}` | {r['dtype']} | {r['bytes']:,} | {r['latency_ms']:.2f} ms | "
              f"{_num(r.get('accuracy'), '.3f')} |" for r in rows]
    return lines
