"""The tensors of a .fkv file: their names, which layers a file stores, their shapes, and the KVCache that a
file's checked tensors build (docs/cache-format.md)."""

import torch
from torch import Tensor

from core.errors import CacheFileError
from core.kvcache import EMPTY, KVCache, LayerKV, Paused
from core.storage.manifest import Manifest


def caches_every_token(paused_layer: int | None, layer: int) -> bool:
    """Whether `layer` holds every context token in order, its positions 0..n-1: a paused prefill's layers up to the
    paused one. A file does not store those positions."""
    return paused_layer is not None and layer <= paused_layer


def stored_layers(manifest: Manifest) -> range:
    """The layers whose keys and values a file holds: a paused prefill's layer 0 is rebuilt from its token ids."""
    return range(0 if manifest.paused_layer is None else 1, manifest.model.num_layers)


def is_float(name: str) -> bool:
    """Whether a stored tensor is one a codec stores: all but positions and token ids."""
    return not name.endswith(".positions") and name != "paused.ids"


def stored_slots(positions: Tensor) -> Tensor | None:
    """The slots a file stores of a layer whose heads keep different numbers of tokens ([kv_heads, n] bool, head
    after head when flattened), or None where every slot holds a token and the layer is stored whole."""
    kept = positions != EMPTY
    return None if bool(kept.all()) else kept


def float_tensors(cache: KVCache) -> dict[str, Tensor]:
    """The float tensors a file stores of `cache` through its codec: keys and values of every layer but a paused
    prefill's layer 0 (rebuilt from the token ids, Runner.first_layer), the paused hidden states and held queries.
    A layer with empty slots stores only its tokens' keys and values, [slots, head_dim], head after head."""
    floats = {}
    for i, layer in enumerate(cache.layers):
        if i or cache.paused is None:
            kept = stored_slots(layer.positions) if layer.padded else None
            floats[f"layers.{i}.keys"] = layer.keys if kept is None else layer.keys[kept]
            floats[f"layers.{i}.values"] = layer.values if kept is None else layer.values[kept]
    if cache.paused is not None:
        floats["paused.hidden"] = cache.paused.hidden
        if cache.paused.queries is not None:
            floats["paused.queries"] = cache.paused.queries
    return floats


def index_tensors(cache: KVCache) -> dict[str, Tensor]:
    """The int32 tensors a file stores of `cache` as they are: each layer's positions but those of a paused
    prefill's layers, which cache every token; a paused prefill's token ids."""
    paused_layer = None if cache.paused is None else cache.paused.layer
    tensors = {
        f"layers.{i}.positions": layer.positions.to(torch.int32).contiguous().cpu()
        for i, layer in enumerate(cache.layers)
        if not caches_every_token(paused_layer, i)
    }
    if cache.paused is not None:
        tensors["paused.ids"] = cache.paused.ids[: cache.seq_len].to(torch.int32).contiguous().cpu()
    return tensors


def expected_names(manifest: Manifest) -> set[str]:
    """The names of the float tensors, positions and token ids a file of this manifest holds."""
    names = {f"layers.{i}.{part}" for i in stored_layers(manifest) for part in ("keys", "values")}
    names |= {
        f"layers.{i}.positions"
        for i in range(manifest.model.num_layers)
        if not caches_every_token(manifest.paused_layer, i)
    }
    if manifest.paused_layer is not None:
        names |= {"paused.hidden", "paused.ids"}
        if manifest.method.make().window is not None:
            names.add("paused.queries")
    return names


def names_mismatch(manifest: Manifest) -> CacheFileError:
    paused = "" if manifest.paused_layer is None else " and a paused prefill"
    return CacheFileError(f"the tensors do not match the model's {manifest.model.num_layers} layers{paused}")


def float_shapes(tensors: dict[str, Tensor], manifest: Manifest) -> dict[str, tuple[int, ...]]:
    """The shape each float tensor a codec stores stands for, from the positions and the manifest."""
    model, context = manifest.model, manifest.context_tokens
    shapes = {}
    for i in stored_layers(manifest):
        positions = tensors.get(f"layers.{i}.positions")
        if positions is not None and (positions.dim() != 2 or positions.shape[0] != model.num_kv_heads):
            raise CacheFileError(f"layer {i} has tensors of the wrong shape")
        kept = None if positions is None else stored_slots(positions)
        if kept is not None:
            shape = (int(kept.sum()), model.head_dim)
        else:
            shape = (model.num_kv_heads, context if positions is None else positions.shape[1], model.head_dim)
        shapes[f"layers.{i}.keys"] = shapes[f"layers.{i}.values"] = shape
    if manifest.paused_layer is not None:
        shapes["paused.hidden"] = (context, model.hidden_size)
    if "paused.queries" in tensors:
        window = min(manifest.method.make().window, context)
        shapes["paused.queries"] = (manifest.paused_layer + 1, model.num_heads, window, model.head_dim)
    return shapes


def layers_from_tensors(tensors: dict[str, Tensor], manifest: Manifest, dtype: torch.dtype) -> list[LayerKV]:
    """The layers a file stores (stored_layers), from float tensors of `dtype`, every shape, dtype and position
    checked."""
    model = manifest.model
    if set(tensors) != expected_names(manifest):
        raise names_mismatch(manifest)
    layers = []
    for i in stored_layers(manifest):
        keys, values = tensors[f"layers.{i}.keys"], tensors[f"layers.{i}.values"]
        # every size is checked against the stored tensors before anything is built from the manifest's counts,
        # which may be any integer
        if caches_every_token(manifest.paused_layer, i):
            n = keys.shape[1] if keys.dim() == 3 else -1
            positions, shaped = None, n == manifest.context_tokens
        else:
            positions = tensors[f"layers.{i}.positions"]
            n = positions.shape[1] if positions.dim() == 2 else -1
            shaped = tuple(positions.shape) == (model.num_kv_heads, n)
        kept = stored_slots(positions) if shaped and positions is not None else None
        expected = (model.num_kv_heads, n, model.head_dim) if kept is None else (int(kept.sum()), model.head_dim)
        if tuple(keys.shape) != expected or tuple(values.shape) != expected or not shaped:
            raise CacheFileError(f"layer {i} has tensors of the wrong shape")
        if positions is None:
            positions = torch.arange(n, dtype=torch.int32).repeat(model.num_kv_heads, 1)
        if positions.dtype != torch.int32 or keys.dtype != dtype or values.dtype != dtype:
            raise CacheFileError(f"layer {i} has tensors of the wrong dtype")
        if kept is not None:
            keys, values = unstored(keys, kept), unstored(values, kept)
        layers.append(checked_layer(i, keys, values, positions, manifest.context_tokens))
    return layers


def unstored(x: Tensor, kept: Tensor) -> Tensor:
    """A layer's [kv_heads, n, head_dim] keys or values from the [slots, head_dim] a file stores: zero at empty
    slots."""
    whole = x.new_zeros(*kept.shape, x.shape[-1])
    whole[kept] = x
    return whole


def checked_layer(i: int, keys: Tensor, values: Tensor, positions: Tensor, context_tokens: int) -> LayerKV:
    """Layer `i` once its positions are inside the context, increasing along each row, and empty slots (head-adaptive
    budgets) only start a row, which keeps some token."""
    empty = positions == EMPTY
    if keys.shape[1] and (positions.min() < EMPTY or positions.max() >= context_tokens):
        raise CacheFileError(f"layer {i} has positions outside the context")
    if (empty[:, 1:] & ~empty[:, :-1]).any() or (keys.shape[1] and empty[:, -1].any()):
        raise CacheFileError(f"layer {i} has empty slots after its tokens")
    if not (positions[:, 1:] > positions[:, :-1])[~empty[:, :-1]].all():
        raise CacheFileError(f"layer {i} has positions out of order")
    return LayerKV(keys, values, positions, padded=bool(empty.any()))


def paused_ids(tensors: dict[str, Tensor], manifest: Manifest) -> Tensor:
    """A query-aware file's context token ids (int64), checked against the context and the vocabulary."""
    ids = tensors["paused.ids"]
    if ids.dtype != torch.int32 or tuple(ids.shape) != (manifest.context_tokens,):
        raise CacheFileError(f"paused.ids should hold {manifest.context_tokens:,} int32 token ids")
    vocabulary = manifest.model.vocab_size
    if ids.min() < 0 or ids.max() >= vocabulary:
        raise CacheFileError(f"paused.ids holds token ids outside the model's vocabulary of {vocabulary:,}")
    return ids.long()


def unbuilt_first_layer(ids: Tensor) -> LayerKV:
    """Layer 0 of a query-aware file loaded without the model (`cache info`): every context token's position in one
    row, and no key or value channels, so nothing can attend to it by mistake."""
    empty = torch.empty(1, len(ids), 0, device=ids.device)
    return LayerKV(empty, empty, torch.arange(len(ids), device=ids.device).unsqueeze(0))


def paused_from_tensors(
    tensors: dict[str, Tensor], layers: list[LayerKV], manifest: Manifest, ids: Tensor, dtype: torch.dtype
) -> Paused:
    """A query-aware cache's paused prefill: nothing cached past `paused_layer`, one hidden state per context token,
    and the queries of the window each question scores with."""
    layer, context, model = manifest.paused_layer, manifest.context_tokens, manifest.model
    hidden = tensors["paused.hidden"]
    if tuple(hidden.shape) != (context, model.hidden_size):
        raise CacheFileError("the paused hidden states have the wrong shape")
    if hidden.dtype != dtype:
        raise CacheFileError("the paused hidden states have the wrong dtype")
    queries = tensors.get("paused.queries")  # none where each question's own tokens are the window
    if queries is not None:
        window = manifest.method.make().window
        if tuple(queries.shape) != (layer + 1, model.num_heads, min(window, context), model.head_dim):
            raise CacheFileError("the paused queries have the wrong shape")
        if queries.dtype != hidden.dtype:
            raise CacheFileError("the paused queries have the wrong dtype")
    for i, cached in enumerate(layers[layer + 1 :], layer + 1):  # (up to it, every token: layers_from_tensors)
        if cached.length:
            raise CacheFileError(f"layer {i} is past the paused layer {layer} but caches tokens")
    return Paused(layer, hidden, queries, ids)


def cache_from_floats(
    tensors: dict[str, Tensor], manifest: Manifest, stored: torch.dtype, device, dtype: torch.dtype | None, model=None
) -> KVCache:
    """The cache that a file's float tensors (of dtype `stored`, as its codec gives them back), positions and token
    ids hold, on `device` in `dtype`; layer 0 of a paused prefill rebuilt by `model` (the Runner) from the token ids,
    or, without it, only its positions (unbuilt_first_layer)."""
    layers = [layer.to(device, dtype) for layer in layers_from_tensors(tensors, manifest, stored)]
    if manifest.paused_layer is None:
        return KVCache(layers, manifest.context_tokens, None)
    ids = paused_ids(tensors, manifest).to(device)
    layers.insert(0, unbuilt_first_layer(ids) if model is None else model.first_layer(ids))
    paused = paused_from_tensors(tensors, layers, manifest, ids, stored)
    return KVCache(layers, manifest.context_tokens, paused.to(device, dtype))
