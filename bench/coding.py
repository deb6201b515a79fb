"""Would coded storage pay for the caches that are not a paused prefill: every token (fullkv) and kvzip's
selection? Coded storage (core/storage/coded.py) holds only a query-aware cache's layers of every token; this
measures, without a file format for the others, the bytes it would store of them.

python bench/coding.py [--tokens 8192] [--model M] [--no-write]

Each cache is built once from real text and its keys and values are treated as coded storage treats a paused
prefill's: one step a tensor with int6's squared error, keys turned back from RoPE at their own positions,
each channel coded as its codes less its median with a frequency table per class of spread. A kvzip layer's
heads keep different tokens, so each head's channels are coded over its own slots. Per cache: the int6 file as
written, and the coded bytes as the ideal entropy of those tables (tables, medians and escapes counted); for
the fullkv cache also the bytes coded.encode stores, which shows how close the estimate is.
"""

import argparse
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from common import MIB, Report, Table, prompt_ids, write_section
from torch import Tensor

from core.documents import read_documents
from core.engine import Engine
from core.kvcache import EMPTY, KVCache
from core.methods import BUILD_METHOD, make_method
from core.options import BuildPlan
from core.saved import fullkv_file_bytes
from core.storage import coded, save_cache
from core.storage.codecs import CODED_PARTS
from core.storage.scheme import quantization_for

INDEX_BYTES = 4  # an int32 position per kept slot and KV head, which every storage keeps as it is


@dataclass
class Estimate:
    """Coded storage's bytes of some channels: symbols at the entropy of their class's table, plus what the coder
    stores beside them."""

    counts: Tensor  # [classes, ALPHABET] symbol counts
    channels: int = 0
    escapes: int = 0

    @classmethod
    def empty(cls) -> "Estimate":
        return cls(torch.zeros(coded.SPREADS * 9 + 1, coded.ALPHABET, dtype=torch.int64))

    def add(self, codes: Tensor) -> None:
        """Codes [tokens, channels] (int64), the way coded.encode counts them."""
        offsets = codes - codes.median(0).values
        symbols = coded.symbols_of(offsets) + coded.spread_classes(offsets) * coded.ALPHABET
        self.counts += torch.bincount(symbols.view(-1), minlength=self.counts.numel()).view(self.counts.shape)
        self.channels += codes.shape[1]
        self.escapes += int((offsets.abs() > coded.SPAN).sum())

    @property
    def bytes(self) -> float:
        used = self.counts[self.counts.sum(1) > 0].double()
        p = used / used.sum(1, keepdim=True)
        symbols = -(used * torch.where(used > 0, p.log2(), 0)).sum() / 8
        tables = len(used) * coded.ALPHABET * 2
        return float(symbols) + tables + self.channels * 5 + self.escapes * 16  # medians int32, classes uint8


def step(x: Tensor, name: str, scheme) -> float:
    return coded.step_for(x, scheme.tensor_bits(name), scheme.group_size, scheme.group_dim(name))


def estimate(runner, cache: KVCache, scheme) -> Estimate:
    """Every layer's keys and values, each head's channels over its own kept slots."""
    found = Estimate.empty()
    for i, layer in enumerate(cache.layers):
        kept = layer.positions != EMPTY
        for part, x in (("keys", layer.keys.float()), ("values", layer.values.float())):
            stored = x if bool(kept.all()) else x[kept]  # the tensor a file stores: a padded layer's kept slots
            size = step(stored, f"layers.{i}.{part}", scheme)
            for head in range(x.shape[0]):
                rows, positions = x[head][kept[head]], layer.positions[head][kept[head]]
                rows = runner.rotate_keys(rows[None], True, positions)[0] if part == "keys" else rows
                found.add(coded.rounded(rows, size))
    return found


def encoded_bytes(runner, cache: KVCache, scheme) -> int:
    """What coded.encode stores of a cache of every token: every layer's channels side by side, keys before RoPE."""
    columns = []
    for i, layer in enumerate(cache.layers):
        for part, x in (("keys", layer.keys.float()), ("values", layer.values.float())):
            size = step(x, f"layers.{i}.{part}", scheme)
            x = runner.rotate_keys(x, inverse=True) if part == "keys" else x
            columns.append(coded.rounded(x.transpose(0, 1).reshape(x.shape[1], -1), size))
    codes = torch.cat(columns, 1)
    stored = coded.encode(lambda start, stop: codes[:, start:stop], codes.shape[1], codes.shape[0])
    return sum(getattr(stored, part.removeprefix("coded.")).nbytes for part in CODED_PARTS)


def int6_file(cache: KVCache, manifest, folder: Path) -> int:
    path = folder / "c.fkv"
    save_cache(path, cache, manifest, "int6", True)
    return path.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--model")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    engine = Engine.load(args.model, None, None)
    runner, tokenizer = engine.runner, engine.loaded.tokenizer
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        document = Path(folder) / "document.txt"
        document.write_text(tokenizer.decode(prompt_ids(tokenizer, args.tokens, "cpu")), encoding="utf-8")
        for name, method in (("fullkv", make_method("fullkv")), (f"{BUILD_METHOD} (default)", None)):
            plan = BuildPlan(method or make_method(BUILD_METHOD))
            saved = engine.build(read_documents([str(document)]), plan)
            cache, manifest = saved.cache, saved.manifest
            scheme = quantization_for("int6", manifest.model, None)
            full = fullkv_file_bytes(manifest.model, manifest.context_tokens)
            slots = sum(int((layer.positions != EMPTY).sum()) for layer in cache.layers)
            coded_bytes = estimate(runner, cache, scheme).bytes + INDEX_BYTES * slots
            encoded = encoded_bytes(runner, cache, scheme) + INDEX_BYTES * slots if method is not None else None
            rows.append((name, int6_file(cache, manifest, Path(folder)), coded_bytes, encoded, full))
    table = Table(
        f"Coded storage of the caches it does not hold, at {args.tokens} tokens",
        ["cache", "int6 file", "coded (estimated)", "coded (coded.encode)", "coded / int6"],
    )
    for name, int6, estimated, encoded, full in rows:
        table.rows.append([
            name, f"{int6 / MIB:.1f} MiB ({int6 / full:.1%})", f"{estimated / MIB:.1f} MiB ({estimated / full:.1%})",
            "—" if encoded is None else f"{encoded / MIB:.1f} MiB ({encoded / full:.1%})", f"{estimated / int6:.2f}",
        ])  # fmt: skip
    table.caption = (
        "Shares of the float16 fullkv file. Estimated: each class table's entropy over its symbols, plus the tables, "
        "each channel's median and class and 16 bytes an escape; both coded columns add the int32 positions the "
        "file keeps. The int6 file is the whole file as `cache build --cache-dtype int6` writes it."
    )
    table.print()
    if not args.no_write:
        report = Report.of("coding", "Coded storage for every-token and kvzip caches", args.model)
        write_section(report.section, report.heading, table.markdown(), engine.loaded.device, None)


if __name__ == "__main__":
    main()
