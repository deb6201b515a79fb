"""The layer loop over a Hugging Face decoder's own modules: prefill the context, extend it, decode."""

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from core.kvcache import KVCache, LayerKV, Paused
from core.methods import FullKV, LayerInput, Method, Selection
from core.models import check_supported
from core.progress import Progress, no_progress
from core.reconstruction import Probe, probe_attention


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    # x: [heads, n, head_dim]; cos/sin: [n, head_dim]
    return x * cos + rotate_half(x) * sin


@dataclass
class Prefill:
    cache: KVCache
    logits: Tensor | None  # [vocab] float32, the next-token logits after the last token; None when paused
    layer_tokens: list[int]  # how many tokens each layer ran on (GemFilter: both passes, in order)


@dataclass
class ProbeRun:
    """A reconstruction probe on its way through the layers: its hidden states, positions and RoPE, and
    the context position each token repeats (-1: the probe's prompt)."""

    h: Tensor  # [m, hidden]
    positions: Tensor  # [m]
    source: Tensor  # [m]
    cos: Tensor
    sin: Tensor

    def span(self, positions: Tensor) -> slice:
        """Where the context tokens this probe repeats lie among those at `positions` (sorted)."""
        copied = self.source[self.source >= 0]
        if not copied.numel():
            return slice(0, 0)
        bounds = torch.stack([copied[0], copied[-1] + 1])
        first, end = torch.searchsorted(positions, bounds).tolist()
        return slice(first, end)

    def following(self, propagated: Tensor, seq_len: int) -> "ProbeRun":
        """The probe's tokens that go on past a TSP layer: its prompt, and its copies of the context
        positions `propagated`."""
        kept = torch.zeros(seq_len, dtype=torch.bool, device=self.source.device)
        kept[propagated] = True
        on = (self.source < 0) | kept[self.source.clamp(min=0)]
        return ProbeRun(self.h[on], self.positions[on], self.source[on], self.cos[on], self.sin[on])


class Runner:
    """Runs a loaded llama/mistral/qwen2/qwen3 model layer by layer, batch size 1.

    The model's own modules do the math (projections, norms, rotary embedding, MLP); the runner
    owns the loop so it can choose which tokens each layer sees and what enters the cache.
    """

    def __init__(self, model):
        check_supported(model.config)
        self.model = model
        self.decoder = model.model
        config = model.config
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.flash = flash_attention(model.device, model.dtype)

    @property
    def num_layers(self) -> int:
        return len(self.decoder.layers)

    def rope(self, h: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        cos, sin = self.decoder.rotary_emb(h, positions.unsqueeze(0))
        return cos[0], sin[0]  # [n, head_dim]

    def qkv(self, layer, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Projections of normed hidden states x [n, hidden] -> q [heads, n, d], k/v [kv_heads, n, d]."""
        attn, n = layer.self_attn, x.shape[0]
        q = attn.q_proj(x).view(n, -1, self.head_dim)
        if hasattr(attn, "q_norm"):  # qwen3 normalises q and k per head before RoPE
            q = attn.q_norm(q)
        return apply_rope(q.transpose(0, 1), cos, sin), *self.kv(layer, x, cos, sin)

    def kv(self, layer, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        """Key and value projections of normed hidden states x [n, hidden] -> k/v [kv_heads, n, d]."""
        attn, n = layer.self_attn, x.shape[0]
        k = attn.k_proj(x).view(n, -1, self.head_dim)
        v = attn.v_proj(x).view(n, -1, self.head_dim)
        if hasattr(attn, "k_norm"):
            k = attn.k_norm(k)
        return apply_rope(k.transpose(0, 1), cos, sin), v.transpose(0, 1)

    def rotate_keys(self, keys: Tensor, inverse: bool = False, positions: Tensor | None = None) -> Tensor:
        """Keys [kv_heads, n, head_dim] turned by RoPE at `positions` [n] (default 0..n-1), or turned back
        (`inverse`): a coded file stores a paused prefill's keys before RoPE, where a channel's values do not spin
        (core/storage/coded.py)."""
        positions = torch.arange(keys.shape[1], device=keys.device) if positions is None else positions
        cos, sin = self.rope(keys[0], positions)
        return apply_rope(keys, cos, -sin if inverse else sin)

    @torch.inference_mode()
    def first_layer(self, ids: Tensor) -> LayerKV:
        """Layer 0's keys and values of the tokens `ids` [n] at positions 0..n-1, as a prefill caches them:
        they depend on nothing but each token and its position, so a saved query-aware cache stores the ids."""
        positions = torch.arange(ids.shape[0], device=ids.device)
        h = self.decoder.embed_tokens(ids)
        cos, sin = self.rope(h, positions)
        layer = self.decoder.layers[0]
        k, v = self.kv(layer, layer.input_layernorm(h), cos, sin)
        return LayerKV(k, v, positions.expand(self.num_kv_heads, -1))

    def attend(self, layer, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool) -> Tensor:
        """Exact attention of q over k/v at KV-head granularity -> o_proj output [n, hidden].

        The queries are the last q.shape[1] of the keys' tokens: `causal` (the same tokens: a prefill, or
        a layer that held nothing before an extend) or an explicit `mask` (tokens appended to a cache) says
        so to SDPA; flash-attn's causal mask is aligned bottom-right, which is that same mask in both
        cases. A per-head mask ([heads, n, keys]: a cache with empty slots) goes to SDPA.
        """
        if self.flash is not None and (mask is None or mask.dim() == 2):
            o = self.flash(
                q.transpose(0, 1).unsqueeze(0),
                k.transpose(0, 1).unsqueeze(0),
                v.transpose(0, 1).unsqueeze(0),
                softmax_scale=layer.self_attn.scaling,
                causal=True,
            )  # [1, n, heads, d]
            return layer.self_attn.o_proj(o[0].reshape(q.shape[1], -1))
        o = F.scaled_dot_product_attention(
            q.unsqueeze(0),
            k.unsqueeze(0),
            v.unsqueeze(0),
            attn_mask=mask,
            is_causal=causal,
            scale=layer.self_attn.scaling,
            enable_gqa=True,
        )  # [1, heads, n, d]
        return layer.self_attn.o_proj(o[0].transpose(0, 1).reshape(q.shape[1], -1))

    def mlp(self, layer, h: Tensor) -> Tensor:
        return h + layer.mlp(layer.post_attention_layernorm(h))

    def rows_read(self, i: int, h: Tensor, q: Tensor, mask: Tensor | None, causal: bool):
        """(h, q, mask, causal) for the rows layer i computes an output for: all of them, except in the
        last layer, whose output is read for the last token only (the logits); the other tokens need
        only its keys and values. The last row sees every key, so it needs no causal mask."""
        if i < self.num_layers - 1:
            return h, q, mask, causal
        return h[-1:], q[:, -1:], None if mask is None else mask[..., -1:, :], False

    def logits(self, h_last: Tensor) -> Tensor:
        return self.model.lm_head(self.decoder.norm(h_last)).float()

    def start_probe(self, probe: Probe, seq_len: int) -> ProbeRun:
        """A probe placed right after the context's seq_len tokens."""
        positions = torch.arange(seq_len, seq_len + probe.ids.shape[0], device=probe.ids.device)
        h = self.decoder.embed_tokens(probe.ids)
        return ProbeRun(h, positions, probe.source, *self.rope(h, positions))

    def run_probes(self, layer, probes: list[ProbeRun], k: Tensor, v: Tensor, positions: Tensor, last: bool) -> Tensor:
        """One layer of every probe over the context's keys k and values v [kv_heads, n, d] at `positions`;
        returns each context key's reconstruction score [kv_heads, n] (by the probe that repeats it; 0 for a
        key none repeats), and moves the probes on unless `last`."""
        scores = torch.zeros(k.shape[0], k.shape[1], dtype=torch.float32, device=k.device)
        for probe in probes:
            q_p, k_p, v_p = self.qkv(layer, layer.input_layernorm(probe.h), probe.cos, probe.sin)
            keys, values = torch.cat([k, k_p], dim=1), torch.cat([v, v_p], dim=1)
            span = probe.span(positions)
            output, scores[:, span] = probe_attention(q_p, keys, values, k.shape[1], span, layer.self_attn.scaling)
            if not last:
                attended = layer.self_attn.o_proj(output.transpose(0, 1).reshape(probe.h.shape[0], -1))
                probe.h = self.mlp(layer, probe.h + attended)
        return scores

    @torch.inference_mode()
    def prefill(
        self,
        ids: Tensor,
        method: Method | None = None,
        progress: Progress = no_progress,
        probes: Sequence[Probe] = (),
    ) -> Prefill:
        """Run the context ids [L] through every layer; the method picks what each layer caches and passes on.

        Attention itself is always exact over the tokens a layer sees; only the cache and the set of
        tokens that reach deeper layers (Token-Selective Propagation) are reduced. A method may pause
        the prefill after a layer: the deeper layers' caches stay empty, there are no logits, and the
        cache holds the hidden states for `extend` to resume from. Reconstruction `probes` run beside the
        context through the first layers the method scores with them (KVzip); a method may defer its
        selection to the end, when every layer's scores are in.
        """
        method = method or FullKV()
        positions = torch.arange(ids.shape[0], device=ids.device)  # original positions of the tokens present
        h = self.decoder.embed_tokens(ids)  # [n, hidden]
        cos, sin = self.rope(h, positions)
        cache, layer_tokens, held_queries, deferred = KVCache(seq_len=ids.shape[0]), [], [], []
        depth = method.reconstruction_depth(ids.shape[0], self.num_layers) if probes else 0
        running = [self.start_probe(probe, ids.shape[0]) for probe in probes] if depth else []
        for i, layer in enumerate(self.decoder.layers):
            q, k, v = self.qkv(layer, layer.input_layernorm(h), cos, sin)
            rows, q_rows, mask, causal = self.rows_read(i, h, q, None, True)
            h = self.mlp(layer, rows + self.attend(layer, q_rows, k, v, mask, causal))
            layer_tokens.append(k.shape[1])
            scores = self.run_probes(layer, running, k, v, positions, last=i == depth - 1) if i < depth else None
            selection = method.select(LayerInput(i, self.num_layers, ids.shape[0], q, k, reconstruction=scores))
            if selection.restart is not None:  # GemFilter: prefill the chosen tokens again from scratch
                progress("prefill", self.num_layers, self.num_layers)
                restarted = self.prefill(ids[selection.restart], FullKV(), progress)
                restarted.layer_tokens = layer_tokens + restarted.layer_tokens
                return restarted
            layer_kv = LayerKV(k, v, positions.expand(self.num_kv_heads, -1))
            cache.layers.append(layer_kv if selection.keep is None else layer_kv.select(selection.keep))
            if selection.hold_queries:
                held_queries.append(q[:, -selection.hold_queries :])
            if selection.pause:
                cache.paused = Paused(i, h, torch.stack(held_queries) if held_queries else None, ids)
                cache.layers += [LayerKV(k[:, :0], v[:, :0], positions[:0].expand(self.num_kv_heads, -1))
                                 for _ in range(i + 1, self.num_layers)]  # fmt: skip
                progress("prefill", self.num_layers, self.num_layers)
                return Prefill(cache, None, layer_tokens)
            if selection.deferred is not None:
                deferred.append(selection.deferred)
            if selection.propagate is not None:
                keep = selection.propagate
                h, positions, cos, sin = h[keep], positions[keep], cos[keep], sin[keep]
                running = [probe.following(positions, ids.shape[0]) for probe in running]
            progress("prefill", i + 1, self.num_layers)
        if deferred:
            keeps = method.select_deferred(deferred, ids.shape[0])
            cache.layers = [layer.select(keep) for layer, keep in zip(cache.layers, keeps, strict=True)]
        return Prefill(cache, self.logits(h[-1]), layer_tokens)

    @torch.inference_mode()
    def extend(self, cache: KVCache, ids: Tensor, method: Method | None = None) -> Tensor:
        """Append ids [n] after the cached context, in place; returns the last token's logits [vocab].

        New tokens attend to every cached key and causally to each other. SDPA's `is_causal`
        aligns the triangle top-left when queries and keys differ in length, so the mask is explicit
        wherever the layer held tokens before.
        With a `method`, each layer's cache is then re-selected with the new tokens as the scoring
        window (the second stage of a saved cache: the question picks what stays). A paused cache is
        resumed where it paused: the tokens the method propagates there (all, if it propagates none)
        go on with their held hidden states, so the deeper layers run as they would have on the
        whole prompt; up to there, the context queries it held join the question's in the scoring window.
        """
        n = ids.shape[0]
        positions = torch.arange(cache.seq_len, cache.seq_len + n, device=ids.device)
        h = self.decoder.embed_tokens(ids)
        cos, sin = self.rope(h, positions)
        for i, layer in enumerate(self.decoder.layers):
            q, k, v = self.qkv(layer, layer.input_layernorm(h), cos, sin)
            cached = cache.layers[i].length
            layer_kv = cache.layers[i] = cache.layers[i].append(k, v, positions)
            valid = layer_kv.valid  # [kv_heads, keys]; None: no empty slots
            # a layer that held nothing (past a resume) sees only the tokens running through it: SDPA's own
            # causal kernel, twice as fast on CPU as the same triangle given as a mask
            causal = cached == 0 and valid is None
            mask = None if causal else appended_mask(h.shape[0], layer_kv.length, ids.device)
            if valid is not None:
                mask = per_head_mask(valid, self.num_heads // self.num_kv_heads, mask)
            rows, q_rows, mask, causal = self.rows_read(i, h, q, mask, causal)
            h = self.mlp(layer, rows + self.attend(layer, q_rows, layer_kv.keys, layer_kv.values, mask, causal))
            selection = Selection()
            if method is not None:
                scoring = q if cache.paused is None else cache.paused.window_queries(i, q)
                context = LayerInput(i, self.num_layers, cache.seq_len + n, scoring, layer_kv.keys, valid)
                selection = method.select(context)
                if selection.keep is not None:
                    cache.layers[i] = layer_kv.select(selection.keep)
            if cache.paused is not None and i == cache.paused.layer:
                # the paused layer caches every context token in order: an index below `cached` is a position
                index = (
                    torch.arange(cached + n, device=ids.device) if selection.propagate is None else selection.propagate
                )
                context, new = index[index < cached], index[index >= cached] - cached
                h = torch.cat([cache.paused.hidden[context], h[new]])
                positions = torch.cat([context, positions[new]])
                cos, sin = self.rope(h, positions)
                cache.paused = None
        cache.seq_len += n
        return self.logits(h[-1])


def flash_attention(device: torch.device, dtype: torch.dtype):
    """flash-attn's kernel where it applies (CUDA, half precision, package installed), else None (SDPA)."""
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return None
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        return None
    return flash_attn_func


def appended_mask(n_new: int, n_keys: int, device: torch.device) -> Tensor | None:
    """[n_new, n_keys] bool: all cached keys visible, the last n_new keys causal; None if all visible."""
    if n_new == 1:
        return None
    mask = torch.ones(n_new, n_keys, dtype=torch.bool, device=device)
    mask[:, n_keys - n_new :] = torch.ones(n_new, n_new, dtype=torch.bool, device=device).tril()
    return mask


def per_head_mask(valid: Tensor, group: int, mask: Tensor | None) -> Tensor:
    """[heads, n_new or 1, n_keys] bool: `mask` ([n_new, n_keys] or None) and, for each query head, the
    slots its KV head (valid: [kv_heads, n_keys]) holds a token in; query head h reads KV head h // group."""
    visible = valid.repeat_interleave(group, dim=0).unsqueeze(1)
    return visible if mask is None else visible & mask
