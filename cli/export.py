"""`sheafprune export`: compact a sheaf (or discover one first) into a slim HF folder and/or ONNX model."""

from __future__ import annotations

import argparse
from pathlib import Path

from sheafprune.cli.discover import add_discover_options, config_from_args
from sheafprune.errors import UserError


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _run(args: argparse.Namespace) -> int:
    from sheafprune.exporter import export
    from sheafprune.exporter.hf import resolve_formats
    from sheafprune.io import check_out_dir
    from sheafprune.sheaf import load_sheaf

    discover_flags = [f"--{k}" for k in ("model", "task", "config") if getattr(args, k, None) is not None]
    if args.sheaf_dir is not None and discover_flags:
        raise UserError(f"pass either SHEAF_DIR or {'/'.join(discover_flags)} (to discover a sheaf first), not both")
    if args.sheaf_dir is None and not discover_flags:
        raise UserError("pass a SHEAF_DIR written by `sheafprune discover`, or --model and --task to discover one first")
    if args.resume:
        raise UserError("--resume continues `sheafprune discover --out DIR`; export discovers in memory, so run "
                        "discover with --resume first, then `sheafprune export DIR`")
    check_out_dir(args.out, overwrite=args.overwrite)  # fail before a long discovery, not after
    options = dict(dtype=args.dtype, quantize=args.quantize, vocab=args.vocab)
    fmts = resolve_formats([args.format], **options)
    if args.quantize and args.format == "safetensors":
        print(f"note: --quantize {args.quantize} writes model.onnx too (the quantized model is made from it)")
    if args.sheaf_dir is not None:
        sheaf = load_sheaf(args.sheaf_dir)
    else:
        from sheafprune.discovery import discover

        cfg = config_from_args(args)
        print(f"discovering a sheaf of {cfg.model} for {cfg.task} ...", flush=True)
        sheaf = discover(cfg)
    print(f"compacting and checking the sheaf of {sheaf.model_name} for {sheaf.task} ...", flush=True)
    info = export(sheaf, out=args.out, formats=sorted(fmts), overwrite=args.overwrite, keep=args.keep, **options)
    d = ", ".join(f"{k} {v:.2%}" for k, v in sheaf.density().items())
    print(f"export written to {args.out} (sheaf kept {d}; max |logit diff| to the masked sheaf {info['max_abs_diff']:.2g})")
    print(f"  parameters {info['params']:,} of {info['params_original']:,} ({info['params'] / info['params_original']:.1%}); "
          f"removed heads {info['heads_removed']:.1%}, neurons {info['neurons_removed']:.1%}, "
          f"layers {info['layers_removed']:.1%}")
    if (args.out / "model.safetensors").exists():
        print(f"  {args.out / 'model.safetensors'}: {_mb(info['bytes'])} (original fp32 weights "
              f"{_mb(info['bytes_original'])}, {info['bytes'] / info['bytes_original']:.1%})")
    if "bytes_onnx" in info:
        print(f"  {args.out / 'model.onnx'}: {_mb(info['bytes_onnx'])} "
              f"(onnxruntime vs torch max diff {info['max_abs_diff_onnx']:.2g})")
    _print_variants(args.out, info)
    if (args.out / "model.safetensors").exists():
        print(f"  load: sheafprune.exporter.load({str(args.out)!r}) or AutoModelForCausalLM.from_pretrained("
              f"{str(args.out)!r}, trust_remote_code=True)")
    m = sheaf.meta.get("metrics", {})
    if info["not_kept"]:
        print(f"not kept: {info['not_kept']}; the files are written for inspection, the model card says so")
        return 3
    print(f"  kept: test accuracy {m.get('sheaf_accuracy', float('nan')):.3f} vs full "
          f"{m.get('full_accuracy', float('nan')):.3f} (floor {info['keep']:g} x full, n={m.get('n', '?')})")
    return 0


def _print_variants(out: Path, info: dict) -> None:
    """What --dtype, --vocab task and --quantize made, and the per-file measurements."""
    from sheafprune.exporter.quantize import INT8_FILE, int8_warning

    if info["dtype"] != "float32":
        print(f"  model.safetensors in {info['dtype']}: max |logit diff| to fp32 {info['max_abs_diff_dtype']:.2g}")
    if info["vocab"] == "task":
        print(f"  task vocabulary: {info['vocab_kept']:,} of {info['vocab_size']:,} token rows kept, others read the "
              f"mean row {info['vocab_fallback_row']} (kept logits vs full vocabulary {info['max_abs_diff_vocab']:.2g})")
    if "bytes_int8" in info:
        print(f"  {out / INT8_FILE}: {_mb(info['bytes_int8'])} (vs model.onnx max diff {info['max_abs_diff_int8']:.2g})")
    b, t = info["latency_batch"]
    for r in info["files"]:
        print(f"  {r['file']}: {r['bytes']:,} bytes, {r['latency_ms']:.2f} ms on a batch of {b} x {t} tokens, "
              f"{info['test_split']} accuracy {r['accuracy']:.3f} (n={info['test_n']})")
    warning = int8_warning(info)
    if warning:
        print(f"warning: {warning}")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="compact a sheaf and write a slim HF (safetensors) and/or ONNX model")
    p.add_argument("sheaf_dir", nargs="?", type=Path, metavar="SHEAF_DIR",
                   help="sheaf folder from `sheafprune discover` (or give --model/--task to discover first)")
    p.add_argument("--format", choices=("safetensors", "onnx", "all"), default="safetensors", help="what to write (default safetensors)")
    p.add_argument("--out", type=Path, required=True, help="export folder to write")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="dtype of model.safetensors, cast after the fp32 exactness check (default float32; ONNX stays fp32)")
    p.add_argument("--quantize", choices=("int8",), default=None,
                   help="also write model.int8.onnx, dynamically quantized (implies model.onnx)")
    p.add_argument("--vocab", choices=("full", "task"), default="full",
                   help="task: keep embedding/head rows only for the task's tokens and the special tokens (default full)")
    add_discover_options(p)
    p.set_defaults(func=_run)
