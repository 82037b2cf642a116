"""The computation graph of a transformer as DiscoGP sees it: writers, readers, and the edges between them.

Writers (in residual-stream order): `in` (embeddings), then per layer `a{l}.h{h}` for each attention head and
`m{l}` for the MLP. Readers: per layer the q input of each query head, the k and v inputs of each KV head
(GQA keeps k/v per KV head so a sheaf can be compacted back into GQA), the MLP input, and the final `out`.
Every reader reads its own masked sum of all writers before it.

Edge masks are stored as one tensor per reader group, rows = writers (in order), columns = readers:
    edge/{l}/q    (W_l, n_heads)         W_l = 1 + l * (n_heads + 1) writers precede layer l's attention
    edge/{l}/k    (W_l, n_kv_heads)
    edge/{l}/v    (W_l, n_kv_heads)
    edge/{l}/mlp  (W_l + n_heads,)       the MLP also reads the heads of its own layer
    edge/out      (1 + L * (n_heads + 1),)
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Graph:
    n_layers: int
    n_heads: int
    n_kv_heads: int

    # --- writers -------------------------------------------------------------------------------
    def writers(self) -> list[str]:
        names = ["in"]
        for layer in range(self.n_layers):
            names += [f"a{layer}.h{h}" for h in range(self.n_heads)] + [f"m{layer}"]
        return names

    def n_writers(self) -> int:
        return 1 + self.n_layers * (self.n_heads + 1)

    def writers_before_attn(self, layer: int) -> int:
        return 1 + layer * (self.n_heads + 1)

    def writers_before_mlp(self, layer: int) -> int:
        return self.writers_before_attn(layer) + self.n_heads

    # --- readers and edge masks ----------------------------------------------------------------
    def kv_name(self, layer: int, group: int) -> str:
        # Without GQA a KV head is its query head; with GQA it gets its own node name.
        return f"a{layer}.h{group}" if self.n_kv_heads == self.n_heads else f"a{layer}.kv{group}"

    def edge_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes: dict[str, tuple[int, ...]] = {}
        for layer in range(self.n_layers):
            w = self.writers_before_attn(layer)
            shapes[f"edge/{layer}/q"] = (w, self.n_heads)
            shapes[f"edge/{layer}/k"] = (w, self.n_kv_heads)
            shapes[f"edge/{layer}/v"] = (w, self.n_kv_heads)
            shapes[f"edge/{layer}/mlp"] = (self.writers_before_mlp(layer),)
        shapes["edge/out"] = (self.n_writers(),)
        return shapes

    def readers(self, key: str) -> list[str]:
        """Reader names (columns) of the edge mask `key`."""
        if key == "edge/out":
            return ["out"]
        _, layer_s, site = key.split("/")
        layer = int(layer_s)
        if site == "q":
            return [f"a{layer}.h{h}.q" for h in range(self.n_heads)]
        if site in ("k", "v"):
            return [f"{self.kv_name(layer, g)}.{site}" for g in range(self.n_kv_heads)]
        return [f"m{layer}.in"]

    def edge_names(self, key: str) -> list[str]:
        """`src->dst` for every entry of edge mask `key`, in row-major (writer, reader) order."""
        shape = self.edge_shapes()[key]
        srcs = self.writers()[: shape[0]]
        dsts = self.readers(key)
        return [f"{s}->{d}" for s in srcs for d in dsts]

    def n_edges(self) -> int:
        total = 0
        for shape in self.edge_shapes().values():
            n = 1
            for s in shape:
                n *= s
            total += n
        return total

    # --- node-level masks ----------------------------------------------------------------------
    def head_shapes(self) -> dict[str, tuple[int, ...]]:
        return {f"head/{layer}": (self.n_heads,) for layer in range(self.n_layers)}
