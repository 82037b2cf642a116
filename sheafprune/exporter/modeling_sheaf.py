"""A compacted sheaf of a causal LM as a Hugging Face model: each kept reader reads only its kept writers.

This file is self-contained (torch + transformers only): every export folder carries a copy, and
`config.json`'s `auto_map` points `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` at
it, so an export loads where sheafprune is not installed.

The residual stream is a list of writers: `in` (embeddings), the kept attention heads `a{l}.h{h}` and
the kept MLPs `m{l}` (original layer/head numbers). Every reader (a head's q input, a KV head's k and v
inputs, an MLP's input, the final `out`) reads the 0/1-weighted sum of the writers it kept, plus a
constant vector (`*_const`) holding what pruned-to-constant writers gave it; then the layer's norm, as
in the source model. Config fields describe both GPT-2 (layernorm, learned positions, ungated MLP) and
Llama (rmsnorm, rotary, gated MLP, GQA) families; per-layer head, KV-head and neuron counts vary.

KV cache: as in a stock HF causal LM (`cache`, formerly `past_key_values`, and `use_cache`, on by default),
a `DynamicCache` holds, for each layer with attention heads, the layer's kept KV heads (B, KV, T, hd) after
RoPE, before they are repeated for the query heads; MLP-only layers hold nothing. With a cache, `input_ids`
are the new tokens only and `attention_mask` covers the cached and the new tokens; positions count the real
tokens of that mask, so left-padded batches continue where each row left off.

A task-vocabulary export (`vocab_keep`, the sorted token ids kept) stores embedding rows for those ids only, plus
one fallback row last: the mean embedding over the full vocabulary, which every other input id reads. Inputs and
logits stay in the tokenizer's ids: the head scores the kept rows (not the fallback) and every other id's logit is
the dtype's lowest float.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import DynamicCache, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import CausalLMOutputWithPast

# The output field that hands the cache back to generate(): `cache` in recent transformers, `past_key_values` before.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class SheafConfig(PretrainedConfig):
    """`layers`: one dict per kept layer: `layer` (original index), `heads` (kept query heads),
    `kv_heads` (kept KV heads), `kv_of_q` (per kept head, its KV head's position in `kv_heads`),
    `n_neurons`, `neurons` (kept MLP units), `b_out` (the MLP has an output bias), `reads` ({"q": [[writer,
    ...] per head], "k", "v": per KV head, "mlp": [writer, ...]}), `const` (reader groups that carry a
    constant input vector).
    `out_reads` / `out_const`: the same for the final reader.
    `vocab_keep`: the sorted token ids whose embedding (and head) rows are kept; empty = the full vocabulary."""

    model_type = "sheaf"

    def __init__(self, family: str = "llama", vocab_size: int = 1, hidden_size: int = 1, head_dim: int = 1,
                 norm: str = "rmsnorm", norm_eps: float = 1e-5, hidden_act: str = "silu", gated: bool = True,
                 positional: str = "rope", attn_scale: float = 1.0, max_position_embeddings: int = 0,
                 rope_inv_freq: Optional[list[float]] = None, rope_attention_scaling: float = 1.0,
                 attn_bias: bool = False, mlp_bias: bool = False, tie_head: bool = True,
                 layers: Optional[list[dict[str, Any]]] = None, out_reads: Optional[list[str]] = None,
                 out_const: bool = False, use_cache: bool = True, vocab_keep: Optional[list[int]] = None,
                 **kwargs: Any):
        self.family, self.vocab_size, self.hidden_size, self.head_dim = family, vocab_size, hidden_size, head_dim
        self.norm, self.norm_eps, self.hidden_act, self.gated = norm, norm_eps, hidden_act, gated
        self.positional, self.attn_scale, self.max_position_embeddings = positional, attn_scale, max_position_embeddings
        self.rope_inv_freq, self.rope_attention_scaling = rope_inv_freq or [], rope_attention_scaling
        self.attn_bias, self.mlp_bias, self.tie_head = attn_bias, mlp_bias, tie_head
        self.layers, self.out_const = layers or [], out_const
        self.vocab_keep = list(vocab_keep or [])
        self.out_reads = ["in"] if out_reads is None else out_reads
        self.num_hidden_layers = len(self.layers)
        kwargs["tie_word_embeddings"] = False  # the tied head is ours (tie_head), not transformers' tying
        self.use_cache = use_cache  # a field here: PretrainedConfig drops generation parameters from kwargs
        super().__init__(**kwargs)


class Norm(nn.Module):
    """LayerNorm or RMSNorm, computed as the source families compute them."""

    def __init__(self, config: SheafConfig):
        super().__init__()
        self.kind, self.eps, self.dim = config.norm, config.norm_eps, config.hidden_size
        self.weight = nn.Parameter(torch.empty(config.hidden_size))
        self.bias = nn.Parameter(torch.empty(config.hidden_size)) if self.kind == "layernorm" else None

    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "layernorm":
            return F.layer_norm(x, (self.dim,), self.weight, self.bias, self.eps)
        dtype = x.dtype
        x = x.to(torch.promote_types(dtype, torch.float32))  # HF's fp32, and fp64 stays fp64 (the exactness check)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Stream:
    """The writers' outputs plus their running sum. Eagerly, all writers live in one preallocated buffer
    (W, B, T, D), so a reader gathers what it needs with a single index_select (or a free slice); while
    tracing for ONNX, as a list of chunks (n, B, T, D), one per add(), which exports to plain Gather/Concat."""

    def __init__(self, n_writers: int, *, keep_rows: bool = True) -> None:
        self.n_writers = n_writers
        self.keep_rows = keep_rows  # False when every reader reads the running sum: no rows to keep
        self.chunks: list[Tensor] = []
        self.buf: Optional[Tensor] = None  # (W, B, T, D), eager only
        self.used = 0
        self.total: Optional[Tensor] = None  # (B, T, D)

    def add(self, chunk: Tensor) -> None:  # chunk (n, B, T, D)
        n = chunk.shape[0]
        if self.keep_rows and torch.jit.is_tracing():
            self.chunks.append(chunk)
        elif self.keep_rows:
            if self.buf is None:
                self.buf = chunk.new_empty((self.n_writers, *chunk.shape[1:]))
            self.buf[self.used:self.used + n] = chunk
        self.used += n
        s = chunk.sum(0)
        self.total = s if self.total is None else self.total + s


class Reader:
    """How a group of R readers reads the stream: gather the K writers any of them reads, then one (R, K) 0/1
    matmul. A group whose readers all read every writer reads the running sum instead.

    The tables come from the config, never from the weights file, so they are plain CPU tensors (also under
    from_pretrained's meta-device init) moved to the input's device when used."""

    def __init__(self, reads: list[list[str]], chunks: list[list[str]]):
        writers = [w for chunk in chunks for w in chunk]
        self.n_readers = len(reads)
        self.reads_all = all(sorted(r) == sorted(writers) for r in reads)
        needed = {w for r in reads for w in r}
        self.picks: list[tuple[int, Optional[Tensor]]] = []  # (chunk, its rows; None = all of them)
        for c, chunk in enumerate(chunks):
            rows = [i for i, w in enumerate(chunk) if w in needed]
            if rows:
                self.picks.append((c, None if len(rows) == len(chunk) else torch.tensor(rows, device="cpu")))
        # Eager reads take the stream rows from the first to the last writer needed, a view (no copy): a
        # matmul over a few unneeded (zero-weight) rows costs less than gathering, on memory-bound CPUs.
        rows = [i for i, w in enumerate(writers) if w in needed]  # stream positions, in stream order
        self.span = (rows[0], rows[-1] + 1) if rows else (0, 0)
        self.weight = torch.zeros(self.span[1] - self.span[0], len(reads), device="cpu")  # (S, R) eager
        for r, names in enumerate(reads):
            for name in names:
                self.weight[writers.index(name) - self.span[0], r] = 1.0
        self.gathered = self.weight[torch.tensor(rows, dtype=torch.long) - self.span[0]] if rows else self.weight  # (K, R)

    def __call__(self, stream: Stream) -> Tensor:
        """(R, B, T, D); (1, B, T, D) when every reader reads everything."""
        total = stream.total  # (B, T, D)
        if self.reads_all:
            return total.unsqueeze(0)
        if not self.picks:
            return total.new_zeros(self.n_readers, *total.shape)
        if stream.buf is None:  # tracing
            parts = [stream.chunks[c] if rows is None else stream.chunks[c].index_select(0, rows.to(total.device))
                     for c, rows in self.picks]
            x, w = (parts[0] if len(parts) == 1 else torch.cat(parts)), self.gathered  # (K, B, T, D), (K, R)
        else:
            x, w = stream.buf[self.span[0]:self.span[1]], self.weight  # (S, B, T, D) view, (S, R)
        out = w.to(total.device, total.dtype).t() @ x.reshape(x.shape[0], -1)  # (R, B*T*D)
        return out.reshape(self.n_readers, *total.shape)


def _linear_heads(x: Tensor, w: Tensor, b: Optional[Tensor]) -> Tensor:
    """x (R, B, T, D) with R in {1, n}, w (n, D, e), b (n, e) -> (n, B, T, e)."""
    r, bsz, t, d = x.shape
    y = torch.matmul(x.reshape(r, bsz * t, d), w)  # (n, B*T, e)
    if b is not None:
        y = y + b[:, None, :]
    return y.reshape(w.shape[0], bsz, t, w.shape[2])


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class SheafLayer(nn.Module):
    """One kept layer: its kept heads (any subset, GQA groups kept as needed) and its kept MLP neurons."""

    def __init__(self, config: SheafConfig, spec: dict[str, Any], chunks_before: list[list[str]]):
        super().__init__()
        d, hd = config.hidden_size, config.head_dim
        self.n_heads, self.n_kv, self.n_neurons = len(spec["heads"]), len(spec["kv_heads"]), spec["n_neurons"]
        self.scale, self.gated = config.attn_scale, config.gated
        self.act = ACT2FN[config.hidden_act]
        const = set(spec.get("const", []))
        head_names = [f"a{spec['layer']}.h{h}" for h in spec["heads"]]
        self.readers: dict[str, Reader] = {}
        self.cache_idx = 0  # this layer's place in the KV cache (among the layers with heads); set by the model
        if self.n_heads:
            self.attn_norm = Norm(config)
            self.q_w = nn.Parameter(torch.empty(self.n_heads, d, hd))  # (H, D, hd)
            self.k_w = nn.Parameter(torch.empty(self.n_kv, d, hd))  # (KV, D, hd)
            self.v_w = nn.Parameter(torch.empty(self.n_kv, d, hd))  # (KV, D, hd)
            self.o_w = nn.Parameter(torch.empty(self.n_heads, hd, d))  # (H, hd, D)
            bias = config.attn_bias
            self.q_b = nn.Parameter(torch.empty(self.n_heads, hd)) if bias else None
            self.k_b = nn.Parameter(torch.empty(self.n_kv, hd)) if bias else None
            self.v_b = nn.Parameter(torch.empty(self.n_kv, hd)) if bias else None
            self.o_b = nn.Parameter(torch.empty(d)) if bias else None  # each head's share of the output bias
            self.kv_of_q = torch.tensor(spec["kv_of_q"], dtype=torch.long, device="cpu")  # (H,)
            shared = set(spec.get("const_shared", []))  # one constant row for all the site's readers
            for site, n in (("q", self.n_heads), ("k", self.n_kv), ("v", self.n_kv)):
                self._reader(site, spec["reads"][site], chunks_before,
                             (1 if site in shared else n) if site in const else 0, d)
        if self.n_neurons:
            i = self.n_neurons
            self.mlp_norm = Norm(config)
            self.w_in = nn.Parameter(torch.empty(d, i))  # (D, I)
            self.w_gate = nn.Parameter(torch.empty(d, i)) if config.gated else None  # (D, I)
            self.w_out = nn.Parameter(torch.empty(i, d))  # (I, D)
            self.b_in = nn.Parameter(torch.empty(i)) if config.mlp_bias else None
            self.b_gate = nn.Parameter(torch.empty(i)) if config.mlp_bias and config.gated else None
            # b_out also holds the constants of folded neurons, so it may exist in a bias-free family.
            self.b_out = nn.Parameter(torch.empty(d)) if spec.get("b_out", True) else None
            chunks = chunks_before + ([head_names] if head_names else [])
            self._reader("mlp", [spec["reads"]["mlp"]], chunks, 1 if "mlp" in const else 0, d)

    def _reader(self, site: str, reads: list[list[str]], chunks: list[list[str]], n_const: int, d: int) -> None:
        self.readers[site] = Reader(reads, chunks)
        if n_const:
            self.register_parameter(f"{site}_const", nn.Parameter(torch.empty(n_const, d)))  # (R, D)
        else:
            self.register_parameter(f"{site}_const", None)

    def read(self, stream: Stream, site: str) -> Tensor:
        x = self.readers[site](stream)  # (R, B, T, D), R = 1 if every reader reads everything
        const = getattr(self, f"{site}_const")
        return x if const is None else x + const[:, None, None, :]

    def forward(self, stream: Stream, bias: Tensor, rope: Optional[tuple[Tensor, Tensor]],
                cache: Optional[DynamicCache] = None) -> None:
        if self.n_heads:
            xq, xk, xv = (self.attn_norm(self.read(stream, s)) for s in "qkv")  # (R, B, T, D) each
            q = _linear_heads(xq, self.q_w, self.q_b)  # (H, B, T, hd)
            k = _linear_heads(xk, self.k_w, self.k_b)  # (KV, B, T, hd)
            v = _linear_heads(xv, self.v_w, self.v_b)  # (KV, B, T, hd)
            if rope is not None:
                cos, sin = rope  # (B, T, hd)
                q = q * cos[None] + _rotate_half(q) * sin[None]
                k = k * cos[None] + _rotate_half(k) * sin[None]
            q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # (B, heads, T, hd)
            if cache is not None:  # the kept KV heads, cached ones first: (B, KV, past + T, hd)
                k, v = cache.update(k, v, self.cache_idx)
            kv_of_q = self.kv_of_q.to(k.device)
            k, v = k.index_select(1, kv_of_q), v.index_select(1, kv_of_q)  # (B, H, past + T, hd)
            z = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)  # (B, H, T, hd)
            z = z.transpose(0, 1)  # (H, B, T, hd)
            h, bsz, t, hd = z.shape
            heads = torch.matmul(z.reshape(h, bsz * t, hd), self.o_w).reshape(h, bsz, t, -1)  # (H, B, T, D)
            stream.add(heads if self.o_b is None else heads + self.o_b)
        if self.n_neurons:
            x = self.mlp_norm(self.read(stream, "mlp"))[0]  # (B, T, D)
            hidden = x @ self.w_in + (self.b_in if self.b_in is not None else 0)  # (B, T, I)
            if self.gated:
                hidden = self.act(x @ self.w_gate + (self.b_gate if self.b_gate is not None else 0)) * hidden
            else:
                hidden = self.act(hidden)
            out = hidden @ self.w_out  # (B, T, D)
            stream.add((out if self.b_out is None else out + self.b_out).unsqueeze(0))  # (1, B, T, D)


def _attn_bias(attention_mask: Tensor, dtype: torch.dtype, t: int) -> Tensor:
    """(B, L) padding mask of the cached and the t new tokens -> (B, 1, t, L) additive causal+padding bias (new
    token i sits at L - t + i; finite minimum: no NaN on pad rows)."""
    n = attention_mask.shape[1]
    causal = torch.ones(t, n, dtype=torch.bool, device=attention_mask.device).tril(n - t)
    allowed = causal[None] & attention_mask.bool()[:, None, :]  # (B, t, L)
    zeros = torch.zeros(allowed.shape, dtype=dtype, device=attention_mask.device)
    return zeros.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]  # (B, 1, t, L)


class SheafPreTrainedModel(PreTrainedModel):
    config_class = SheafConfig
    base_model_prefix = "sheaf"
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        pass  # every parameter comes from model.safetensors; there is nothing to initialize


class SheafForCausalLM(SheafPreTrainedModel, GenerationMixin):
    def __init__(self, config: SheafConfig):
        super().__init__(config)
        d = config.hidden_size
        keep = config.vocab_keep
        # With vocab_keep: the kept rows, then the fallback row that every other id reads.
        self.embed = nn.Embedding(len(keep) + 1 if keep else config.vocab_size, d)
        self._vocab_tables(config.vocab_size, keep)
        self.pos = nn.Embedding(config.max_position_embeddings, d) if config.positional == "learned" else None
        chunks: list[list[str]] = [["in"]]  # writer names, grouped as the stream adds them
        layers = []
        for spec in config.layers:
            layers.append(SheafLayer(config, spec, list(chunks)))
            if spec["heads"]:
                chunks.append([f"a{spec['layer']}.h{h}" for h in spec["heads"]])
            if spec["n_neurons"]:
                chunks.append([f"m{spec['layer']}"])
        self.layers = nn.ModuleList(layers)
        attention = [layer for layer in layers if layer.n_heads]
        for i, layer in enumerate(attention):
            layer.cache_idx = i  # where the layer's KV heads live in the cache
        self.n_attention = len(attention)
        self.norm = Norm(config)
        self.lm_head = None if config.tie_head else nn.Linear(d, len(keep) or config.vocab_size, bias=False)
        self.out_reader = Reader([config.out_reads], chunks)
        self.n_writers = sum(len(c) for c in chunks)
        readers = [self.out_reader] + [r for layer in layers for r in layer.readers.values()]
        self.keep_rows = not all(r.reads_all for r in readers)
        self.out_const = nn.Parameter(torch.empty(d)) if config.out_const else None
        self.inv_freq = torch.tensor(config.rope_inv_freq, dtype=torch.float32, device="cpu")  # (hd/2,)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def _vocab_tables(self, vocab_size: int, keep: list[int]) -> None:
        """Tables from the config, not the weights file: `vocab_row` (V,) id -> embedding row, the fallback row (last)
        for ids not kept; `vocab_ids` (K,) the kept ids, where the head's K logits go. None without keep. Plain CPU
        tensors moved to the input's device when used, like the readers' tables: transformers' loader replaces
        non-persistent buffers with uninitialized memory. vocab_row is int32: in model.onnx it is a constant of
        4 bytes per id of the full vocabulary (int64 would double that, often more than the kept weights)."""
        self.vocab_row = self.vocab_ids = None
        if keep:
            self.vocab_ids = torch.tensor(keep, dtype=torch.long, device="cpu")  # (K,)
            self.vocab_row = torch.full((vocab_size,), len(keep), dtype=torch.int32, device="cpu")  # (V,)
            self.vocab_row[self.vocab_ids] = torch.arange(len(keep), dtype=torch.int32, device="cpu")

    def _head(self, h: Tensor) -> Tensor:
        """(B, T, D) -> logits (B, T, V); with vocab_keep, ids not kept get the lowest float."""
        if self.lm_head is not None:
            logits = self.lm_head(h)
        else:  # tied: the kept embedding rows, never the fallback row
            logits = F.linear(h, self.embed.weight if self.vocab_ids is None else self.embed.weight[:-1])
        if self.vocab_ids is None:
            return logits
        full = logits.new_full((*logits.shape[:-1], self.config.vocab_size), torch.finfo(logits.dtype).min)
        ids = self.vocab_ids.to(logits.device).expand(*logits.shape[:-1], -1)  # (B, T, K)
        return full.scatter(-1, ids, logits)  # (B, T, V)

    def _rope(self, position_ids: Tensor, dtype: torch.dtype) -> Optional[tuple[Tensor, Tensor]]:
        if self.config.positional != "rope":
            return None
        inv = self.inv_freq.to(position_ids.device)[None, :, None].float().expand(position_ids.shape[0], -1, 1)  # (B, hd/2, 1)
        freqs = (inv @ position_ids[:, None, :].float()).transpose(1, 2)  # (B, T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, hd)
        s = self.config.rope_attention_scaling
        return (emb.cos() * s).to(dtype), (emb.sin() * s).to(dtype)  # computed in fp32, used in the model's dtype

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                position_ids: Optional[Tensor] = None, labels: Optional[Tensor] = None,
                cache: Optional[DynamicCache] = None, use_cache: Optional[bool] = None,
                past_key_values: Optional[DynamicCache] = None, **kwargs: Any) -> CausalLMOutputWithPast:
        """`input_ids` (B, T): the tokens after those in `cache` (`past_key_values`: its older name), if any;
        `attention_mask` (B, past + T) covers both. Returns the logits of the T tokens and the updated cache."""
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None and not torch.jit.is_tracing():  # no cache inside the ONNX graph
            cache = DynamicCache()
        t = input_ids.shape[1]
        if attention_mask is None:
            past = cache.get_seq_length() if cache is not None else 0
            attention_mask = torch.ones(input_ids.shape[0], past + t, dtype=torch.long, device=input_ids.device)
        if position_ids is None:  # positions count only real tokens (left padding)
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, past + T)
            if position_ids.shape[1] > t:
                position_ids = position_ids[:, -t:]  # (B, T)
        rows = input_ids if self.vocab_row is None else self.vocab_row.to(input_ids.device)[input_ids]
        x = self.embed(rows)  # (B, T, D)
        if self.pos is not None:
            x = x + self.pos(position_ids)
        stream = Stream(self.n_writers, keep_rows=self.keep_rows)
        stream.add(x.unsqueeze(0))
        bias = _attn_bias(attention_mask, x.dtype, t)  # (B, 1, T, past + T)
        rope = self._rope(position_ids, x.dtype)
        if cache is not None and not self.n_attention:  # no KV heads: a placeholder, so the cache knows its length
            cache.update(x.new_zeros(x.shape[0], 1, t, 1), x.new_zeros(x.shape[0], 1, t, 1), 0)
        for layer in self.layers:
            layer(stream, bias, rope, cache)
        h = self.out_reader(stream)[0]  # (B, T, D)
        if self.out_const is not None:
            h = h + self.out_const
        h = self.norm(h)
        logits = self._head(h)  # (B, T, V)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                   labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache})
