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

Every mask key is built and read by the functions below (the only place the key format is written):
    w/<HF weight name>   weight mask, shaped like the weight
    neuron/{l}           (d_mlp,)
    head/{l}             (n_heads,)
    edge/{l}/{site}      as above
    mean/<head or neuron key>  under mean ablation, what a pruned unit writes: (n_heads, D) or (d_mlp,)
    masked/<HF weight name>    a whole masked weight, assembled from row shards (discovery/shard.py)
"""

from __future__ import annotations

from dataclasses import dataclass

# --- mask keys ------------------------------------------------------------------------------------
MASK_TYPES = ("weight", "neuron", "head", "edge")
_PREFIX = {"weight": "w/", "neuron": "neuron/", "head": "head/", "edge": "edge/"}
MEAN_PREFIX = "mean/"  # mean/head/{l} (H, D), mean/neuron/{l} (I,): what a pruned unit writes (masked.py)
_MASKED_PREFIX = "masked/"
EDGE_OUT = "edge/out"  # the final reader's edges


def mask_type(key: str) -> str:
    for t, prefix in _PREFIX.items():
        if key.startswith(prefix):
            return t
    raise ValueError(f"not a mask key: {key!r}")


def is_type(key: str, t: str) -> bool:
    """Whether `key` is a mask key of type `t` (False for mean and masked-weight keys)."""
    return key.startswith(_PREFIX[t])


def weight_key(name: str) -> str:
    return _PREFIX["weight"] + name


def weight_name(key: str) -> str:
    """The HF weight name a weight mask key gates."""
    return key[len(_PREFIX["weight"]):]


def neuron_key(layer: int) -> str:
    return f"{_PREFIX['neuron']}{layer}"


def head_key(layer: int) -> str:
    return f"{_PREFIX['head']}{layer}"


def edge_key(layer: int, site: str) -> str:
    """The edge mask of layer `layer`'s reader group `site` (q, k, v or mlp)."""
    return f"{_PREFIX['edge']}{layer}/{site}"


def key_layer(key: str) -> str:
    """The layer part of a neuron, head or edge key: "3" of neuron/3, head/3, edge/3/q; "out" of edge/out."""
    return key.split("/")[1]


def edge_site(key: str) -> str:
    """The reader group of an edge key: q, k, v, mlp or out."""
    return key.split("/")[-1]


def mean_key(key: str) -> str:
    """The mean-ablation key of a head or neuron key."""
    return MEAN_PREFIX + key


def is_mean_key(key: str) -> bool:
    return key.startswith(MEAN_PREFIX)


def mean_of(key: str) -> str:
    """The head or neuron key a mean-ablation key belongs to."""
    return key[len(MEAN_PREFIX):]


def masked_weight_key(name: str) -> str:
    """Where the masked forward reads the whole masked weight `name` when one is given (sharded training)."""
    return _MASKED_PREFIX + name


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
            shapes[edge_key(layer, "q")] = (w, self.n_heads)
            shapes[edge_key(layer, "k")] = (w, self.n_kv_heads)
            shapes[edge_key(layer, "v")] = (w, self.n_kv_heads)
            shapes[edge_key(layer, "mlp")] = (self.writers_before_mlp(layer),)
        shapes[EDGE_OUT] = (self.n_writers(),)
        return shapes

    def readers(self, key: str) -> list[str]:
        """Reader names (columns) of the edge mask `key`."""
        if key == EDGE_OUT:
            return ["out"]
        layer, site = int(key_layer(key)), edge_site(key)
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
        return {head_key(layer): (self.n_heads,) for layer in range(self.n_layers)}
