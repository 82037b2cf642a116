"""`sheafprune show`: a sheaf drawn as its computation graph, plus the kept fraction per layer of each mask type.

Everything is read from the mask tensors (their keys and shapes give the layers, heads and KV heads), so drawing
needs no model weights and works for any model a sheaf was made for. Only kept entries (logit > 0) are drawn;
edges get an alpha that falls with their number, so SmolLM2's tens of thousands of edges stay legible.
"""

from __future__ import annotations

import io
import math
import os
import re
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any, Union

import numpy as np
from torch import Tensor

from .errors import UserError
from .graph import EDGE_OUT, MASK_TYPES, Graph, edge_key, edge_site, head_key, is_type, key_layer, mask_type, neuron_key
from .io import check_writable_parent
from .sheaf import Sheaf, load_sheaf

_LAYER = re.compile(r"\.(?:h|layers)\.(\d+)\.")  # GPT-2 `transformer.h.{l}.`, Llama `model.layers.{l}.`
_SITE_COLOR = {"q": "tab:blue", "k": "tab:green", "v": "tab:orange", "mlp": "tab:purple", "out": "tab:red"}


def layer_of(key: str) -> str:
    """The layer a mask entry belongs to, as a label: edges by their reader's layer, `out` for the final reader."""
    if key == EDGE_OUT:
        return "out"
    if is_type(key, "weight"):
        m = _LAYER.search(key)
        return m.group(1) if m else "other"
    return key_layer(key)


def _kept(v: Tensor) -> np.ndarray:
    """The sheaf's deterministic mask (keep iff logit > 0) as a numpy bool array, wherever the logits live."""
    return (v.detach() > 0).cpu().numpy()


def _label_order(label: str) -> float:
    return int(label) if label.isdigit() else math.inf


def layer_densities(logits: dict[str, Tensor]) -> dict[str, dict[str, float]]:
    """Kept fraction per mask type and layer label (`"0"`, `"1"`, ..., and `"out"` for edges into the output)."""
    kept: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    total: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for key, v in logits.items():
        t, label = mask_type(key), layer_of(key)
        kept[t][label] += int(_kept(v).sum())
        total[t][label] += v.numel()
    return {t: {lab: kept[t][lab] / total[t][lab] for lab in sorted(kept[t], key=_label_order)}
            for t in MASK_TYPES if t in kept}


def graph_of(logits: dict[str, Tensor]) -> tuple[Graph, bool]:
    """The graph the masks were made for, from their shapes; the flag says whether the head count is known
    (edge or head masks give it; a weight/neuron-only sheaf is drawn with one attention node per layer)."""
    layers = {int(layer_of(k)) for k in logits if layer_of(k).isdigit()}
    n_layers = max(layers) + 1 if layers else 0
    q0, k0, h0 = edge_key(0, "q"), edge_key(0, "k"), head_key(0)
    if q0 in logits:
        n_heads = logits[q0].shape[1]
        graph, known = Graph(n_layers, n_heads, logits[k0].shape[1] if k0 in logits else n_heads), True
    elif h0 in logits:
        graph, known = Graph(n_layers, logits[h0].shape[0], logits[h0].shape[0]), True
    else:
        graph, known = Graph(n_layers, 1, 1), False
    expected = {**graph.edge_shapes(), **graph.head_shapes()} if known else {}
    for key, v in logits.items():
        if mask_type(key) in ("edge", "head") and tuple(v.shape) != expected.get(key):
            raise UserError(f"mask {key!r} has shape {tuple(v.shape)}, but the other masks describe a graph with "
                            f"{n_layers} layers and {graph.n_heads} heads ({expected.get(key)}); the sheaf is damaged, "
                            "re-run discovery")
    if graph.n_kv_heads == 0 or graph.n_heads % graph.n_kv_heads:
        raise UserError(f"the edge masks give {graph.n_heads} query heads and {graph.n_kv_heads} KV heads, which do "
                        "not group; the sheaf is damaged, re-run discovery")
    return graph, known


class _Layout:
    """Where each writer and reader is drawn: x = layer, y = head index; each MLP in a row of its own below the
    heads, half a layer right of its layer's heads (it reads them); `in` and `out` at the middle height."""

    MLP_Y = -1.2

    def __init__(self, graph: Graph):
        self.graph = graph
        self.mid = (graph.n_heads - 1) / 2
        self.writers = graph.writers()
        pos = [(-0.6, self.mid)]
        for layer in range(graph.n_layers):
            pos += [(layer, h) for h in range(graph.n_heads)] + [(layer + 0.5, self.MLP_Y)]
        self.pos = np.array(pos, dtype=float)  # (n_writers, 2), in writer order

    def head(self, layer: int, h: int) -> int:
        return self.graph.writers_before_attn(layer) + h

    def mlp(self, layer: int) -> int:
        return self.graph.writers_before_mlp(layer)

    def group(self, g: int) -> range:
        """The query heads that read KV head g (HF's repeat_kv: head h uses KV head h // group size)."""
        size = self.graph.n_heads // self.graph.n_kv_heads
        return range(g * size, (g + 1) * size)

    def readers(self, key: str) -> tuple[np.ndarray, list[list[int]]]:
        """Positions of the readers (columns) of edge mask `key`, and the writers each reader belongs to."""
        g = self.graph
        if key == EDGE_OUT:
            return np.array([[g.n_layers, self.mid]]), [[]]
        layer, site = int(key_layer(key)), edge_site(key)
        if site == "mlp":
            return self.pos[[self.mlp(layer)]], [[self.mlp(layer)]]
        if site == "q" or g.n_kv_heads == g.n_heads:
            heads = [[self.head(layer, h)] for h in range(g.n_heads)]
            return self.pos[[h[0] for h in heads]], heads
        groups = [[self.head(layer, h) for h in self.group(kv)] for kv in range(g.n_kv_heads)]
        return np.array([[layer - 0.15, self.pos[grp].mean(axis=0)[1]] for grp in groups]), groups


def _edges(logits: dict[str, Tensor], layout: _Layout) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Kept edges as line segments per reader site, and which writers touch a kept edge."""
    segments: dict[str, list[np.ndarray]] = {}
    touched = np.zeros(len(layout.writers), dtype=bool)
    for key, v in logits.items():
        if not is_type(key, "edge"):
            continue
        kept = _kept(v).reshape(v.shape[0], -1)
        rows, cols = np.nonzero(kept)
        reader_pos, reader_nodes = layout.readers(key)
        segments.setdefault(edge_site(key), []).append(np.stack([layout.pos[rows], reader_pos[cols]], axis=1))
        touched[rows] = True
        for c in np.unique(cols):
            touched[reader_nodes[c]] = True
    return {site: np.concatenate(s) for site, s in segments.items()}, touched


def _alive(logits: dict[str, Tensor], layout: _Layout, touched: np.ndarray, has_edges: bool) -> np.ndarray:
    """Writers the sheaf keeps: not pruned by a head/neuron mask and, with edge masks, on some kept edge."""
    alive = touched.copy() if has_edges else np.ones(len(layout.writers), dtype=bool)
    for layer in range(layout.graph.n_layers):
        if head_key(layer) in logits:
            heads = [layout.head(layer, h) for h in range(layout.graph.n_heads)]
            alive[heads] &= _kept(logits[head_key(layer)])
        if neuron_key(layer) in logits:
            alive[layout.mlp(layer)] &= bool(_kept(logits[neuron_key(layer)]).any())
    return alive


def _pct(density: dict[str, float]) -> str:
    return ", ".join(f"{t} {d:.2%}" for t, d in density.items())


def _title(sheaf: Sheaf, density: dict[str, float]) -> str:
    m = sheaf.meta.get("metrics") or {}
    acc = " / ".join(f"{name} {m[k]:.3f}" for name, k in (("full", "full_accuracy"), ("sheaf", "sheaf_accuracy"),
                                                         ("complement", "complement_accuracy"))
                     if isinstance(m.get(k), (int, float)))
    line2 = f"{m.get('split', 'test')} accuracy {acc}" + (f" (n={m['n']})" if "n" in m else "") if acc else ""
    return f"{sheaf.model_name} · {sheaf.meta['task']} · kept {_pct(density)}" + (f"\n{line2}" if line2 else "")


def _check_matplotlib() -> None:
    """matplotlib is an extra; say how to get it before loading a large sheaf, not after."""
    try:
        import matplotlib.backends.backend_agg  # noqa: F401
        import matplotlib.figure  # noqa: F401
    except ImportError:
        raise UserError("drawing needs matplotlib, which is not installed; "
                        "run `pip install 'sheafprune[show]'`") from None


def _draw(sheaf: Sheaf, summary: dict[str, Any], layout: _Layout, segments: dict[str, np.ndarray],
          alive: np.ndarray, known: bool) -> bytes:
    """Render both panels to PNG bytes with Agg on a Figure of our own (no pyplot state); nothing touches the disk."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.collections import LineCollection
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    g = layout.graph
    fig = Figure(figsize=(min(24.0, 4 + 0.6 * max(g.n_layers, 4)), 10), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax, bars = fig.subplots(2, 1, height_ratios=(3, 2))
    fig.suptitle(_title(sheaf, summary["density"]), fontsize=11)

    n_kept = summary["edges_kept"]
    alpha = min(0.8, max(0.03, 15 / math.sqrt(max(n_kept, 1))))
    for site, segs in segments.items():
        ax.add_collection(LineCollection(segs, colors=_SITE_COLOR[site], alpha=alpha, linewidths=0.7, zorder=1))
    kind = np.array([w[0] for w in layout.writers])  # i(n), a (head), m (MLP)
    for k, marker in (("i", "D"), ("a", "o"), ("m", "s")):
        for keep, color in ((True, "black"), (False, "lightgrey")):
            sel = (kind == k) & (alive == keep)
            ax.scatter(layout.pos[sel, 0], layout.pos[sel, 1], s=28, marker=marker, c=color, zorder=2,
                       edgecolors="none" if keep else "grey")
    out_read = len(segments.get("out", ())) > 0 or not summary["edges_total"]  # grey: the sheaf reaches no output
    ax.scatter([g.n_layers], [layout.mid], s=40, marker="D", c="tab:red" if out_read else "lightgrey",
               edgecolors="none" if out_read else "grey", zorder=2)
    ax.set_xticks([-0.6, *range(g.n_layers), g.n_layers], ["in", *map(str, range(g.n_layers)), "out"])
    if g.n_kv_heads != g.n_heads:  # GQA: k/v edges end at their KV head, drawn left of the query heads it serves
        kv = np.concatenate([layout.readers(edge_key(layer, "k"))[0] for layer in range(g.n_layers)])
        ax.scatter(kv[:, 0], kv[:, 1], s=18, marker=">", facecolors="none", edgecolors="grey", zorder=2)
    ax.set_yticks([layout.MLP_Y, *range(g.n_heads)],
                  ["MLP", *([f"h{h}" for h in range(g.n_heads)] if known else ["attn"])])
    ax.set_xlim(-1.0, g.n_layers + 0.4)
    ax.set_ylim(layout.MLP_Y - 0.5, g.n_heads - 0.5)
    ax.set_xlabel("layer (circles: heads; squares: MLPs" + ("; triangles: KV heads" if g.n_kv_heads != g.n_heads
                                                              else "") + ")")
    if summary["edges_total"]:
        ax.set_title(f"kept edges {n_kept:,} of {summary['edges_total']:,}; live nodes {summary['nodes_kept']} of "
                     f"{summary['nodes_total']} (grey: no kept edge or pruned)", fontsize=10)
        handles = [Line2D([], [], color=c, label=f"into {s}") for s, c in _SITE_COLOR.items()
                   if len(segments.get(s, ()))]
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    else:
        ax.set_title("no edge masks in this sheaf: every edge is kept" + ("" if known else "; heads not masked"),
                     fontsize=10)

    for t, per_layer in summary["layer_density"].items():
        xs = [_label_order(lab) if lab.isdigit() else g.n_layers for lab in per_layer if lab != "other"]
        ys = [d for lab, d in per_layer.items() if lab != "other"]
        bars.plot(xs, ys, marker="o", label=f"{t} ({summary['density'][t]:.2%} overall)")
    with_out = "edge" in summary["layer_density"]
    bars.set_xticks(range(g.n_layers + with_out), [*map(str, range(g.n_layers)), *(["out"] if with_out else [])])
    bars.set_xlim(-0.6, g.n_layers - 0.6 + with_out)
    top = max((d for per_layer in summary["layer_density"].values() for d in per_layer.values()), default=1.0)
    bars.set_ylim(0, min(1.02, max(0.05, 1.15 * top)))  # a few-percent sheaf is not a flat line at the bottom
    bars.set_xlabel("layer (edges by the layer that reads them)")
    bars.set_ylabel("kept fraction")
    bars.grid(alpha=0.3)
    bars.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def check_png_out(out: Path, *, overwrite: bool) -> None:
    """Refuse, before any work, a target that is no .png, a folder, an existing file without overwrite, or
    a place we cannot write."""
    if out.suffix.lower() != ".png":
        raise UserError(f"--out {out} must end in .png (show writes a PNG image)")
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give a file name ending in .png")
    if out.exists() and not overwrite:
        raise UserError(f"{out} exists; pass --overwrite or choose another --out")
    check_writable_parent(out)


def write_atomic(out: Path, data: bytes) -> None:
    """Write via a temporary sibling and rename, so `out` appears whole or not at all (folders made for it go
    again on failure)."""
    made = [p for p in [out.parent, *out.parent.parents] if not p.exists()]
    tmp = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; an image is readable like any other file
        os.replace(tmp, out)
    except BaseException as e:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        for p in made:  # innermost first
            try:
                p.rmdir()
            except OSError:
                pass
        if isinstance(e, OSError):
            raise UserError(f"cannot write {out}: {e.strerror} (disk full or not writable?); "
                            "nothing was written") from None
        raise


def draw_sheaf(sheaf: Union[Sheaf, str, os.PathLike], out: Path, *, overwrite: bool = False) -> dict[str, Any]:
    """Draw `sheaf` (a Sheaf or a sheaf folder) to the PNG `out`; return what was drawn:
    `density` (overall, per mask type), `layer_density` (per mask type, per layer label as in layer_densities),
    `edges_kept`/`edges_total`, `nodes_kept`/`nodes_total` (writers), the graph's shape and `out`."""
    out = Path(out)
    check_png_out(out, overwrite=overwrite)
    _check_matplotlib()
    if not isinstance(sheaf, Sheaf):
        sheaf = load_sheaf(Path(sheaf))
    graph, known = graph_of(sheaf.logits)
    layout = _Layout(graph)
    segments, touched = _edges(sheaf.logits, layout)
    has_edges = any(is_type(k, "edge") for k in sheaf.logits)
    alive = _alive(sheaf.logits, layout, touched, has_edges)
    edge_logits = [v for k, v in sheaf.logits.items() if is_type(k, "edge")]
    summary: dict[str, Any] = {
        "model": sheaf.model_name, "task": sheaf.meta["task"],
        "n_layers": graph.n_layers, "n_heads": graph.n_heads if known else None,
        "n_kv_heads": graph.n_kv_heads if known else None,
        "density": {t: d for t, d in sorted(sheaf.density().items(), key=lambda td: MASK_TYPES.index(td[0]))},
        "layer_density": layer_densities(sheaf.logits),
        "edges_kept": sum(len(s) for s in segments.values()),
        "edges_total": sum(v.numel() for v in edge_logits),
        "nodes_kept": int(alive.sum()), "nodes_total": len(layout.writers),
        "metrics": sheaf.meta.get("metrics") or {}, "out": str(out),
    }
    write_atomic(out, _draw(sheaf, summary, layout, segments, alive, known))
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """The one line `sheafprune show` prints."""
    edges = (f"; {summary['edges_kept']:,} of {summary['edges_total']:,} edges" if summary["edges_total"] else "")
    return (f"sheaf drawing written to {summary['out']}: kept {_pct(summary['density'])}{edges}, "
            f"{summary['nodes_kept']} of {summary['nodes_total']} nodes live")
