"""Helpers shared by the test modules: in-process CLI calls, the one-line error contract, documents, the HF forward
and the independent references of the methods' scores, and subprocesses that are interrupted."""

import hashlib
import math
import signal
from pathlib import Path

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
from typer.testing import CliRunner

from core.documents import Document
from core.engine import Engine
from core.kvcache import KVCache
from core.methods import Budget, make_method
from core.options import BuildPlan
from fastkv_cli.app import app


def fastkv(*args, input: str | None = None):
    """`fastkv ARGS...` in this process (arguments may be paths or numbers)."""
    return CliRunner().invoke(app, [str(arg) for arg in args], input=input, prog_name="fastkv")


def assert_one_line_error(result, *needles: str, code: int = 2) -> str:
    """Exit `code`, nothing on stdout, one line on stderr containing every needle, no traceback."""
    assert result.exit_code == code, result.output
    assert isinstance(result.exception, SystemExit), result.exc_info  # not an escaped exception
    assert result.stdout == ""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


PAGES = [  # the tiny saved caches' document (conftest.py)
    " ".join(f"In {1800 + i} the keeper logged {i} ships and {i % 7} storms." for i in range(6)),
    " ".join(f"Page two, line {i}: the lamp burned {i * 3} litres of oil." for i in range(6)),
]
QUESTION = "When was the lighthouse automated?"  # asked of the tiny saved caches' document
RESERVED = 128  # the tiny folder's window is 512, less than build's default reserve


def build(engine: Engine, document: Document, budget: str = "50%", query_budget: str | None = None, **kw):
    """A saved context of `document` as `cache build` makes it, at a fixed window (query-aware files hold queries)."""
    method = make_method("fastkv", budget=budget, window=8)
    query = None if query_budget is None else Budget.parse(query_budget)
    return engine.build([document], BuildPlan(method, query, **kw), reserved=RESERVED)


def make_document(pages: list[str], name: str = "harrow.txt") -> Document:
    """A Document as core.documents reads it: pages joined by blank lines, each page's span kept."""
    text = "\n\n".join(pages)
    spans, start = [], 0
    for page in pages:
        spans.append((start, start + len(page)))
        start += len(page) + 2
    data = text.encode()
    return Document(name, text, hashlib.sha256(data).hexdigest(), len(data), tuple(spans))


def hf_last_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """The HF model's own forward on ids [L] -> the last position's logits [vocab], float32."""
    with torch.inference_mode():
        return model(ids.unsqueeze(0)).logits[0, -1].float()


def random_ids(n: int, vocab: int, seed: int) -> torch.Tensor:
    """n seeded random token ids [n] below `vocab`, on the CPU."""
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


DTYPE_BITS = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}


def assert_bit_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    if a.is_floating_point():
        a, b = a.view(DTYPE_BITS[a.dtype]), b.view(DTYPE_BITS[b.dtype])
    assert torch.equal(a, b)


def assert_same_cache(a: KVCache, b: KVCache) -> None:
    """Every layer's keys, values and positions, and a paused prefill's hidden states and held queries,
    equal bit for bit."""
    assert a.seq_len == b.seq_len
    assert len(a.layers) == len(b.layers)
    for x, y in zip(a.layers, b.layers, strict=True):
        assert_bit_equal(x.keys, y.keys)
        assert_bit_equal(x.values, y.values)
        assert_bit_equal(x.positions, y.positions)
    assert (a.paused is None) == (b.paused is None)
    if a.paused is not None:
        assert a.paused.layer == b.paused.layer
        assert_bit_equal(a.paused.hidden, b.paused.hidden)
        assert (a.paused.queries is None) == (b.paused.queries is None)
        if a.paused.queries is not None:
            assert_bit_equal(a.paused.queries, b.paused.queries)


def full_prefill(model, ids: torch.Tensor):
    """The HF model's own forward on ids [L], with every layer's input (hidden_states)."""
    with torch.inference_mode():
        return model(ids[None], output_hidden_states=True)


def hf_qk(model, index: int, hidden: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer `index`'s queries [heads, n, d] and keys [kv_heads, n, d] after RoPE, the HF modules' way.

    hidden: [n, hidden] input of the layer (HF's hidden_states[index]); positions: [n] position ids.
    """
    layer = model.model.layers[index]
    attn, n = layer.self_attn, hidden.shape[0]
    with torch.inference_mode():
        x = layer.input_layernorm(hidden[None])
        q = attn.q_proj(x).view(1, n, -1, attn.head_dim)
        k = attn.k_proj(x).view(1, n, -1, attn.head_dim)
        if hasattr(attn, "q_norm"):
            q, k = attn.q_norm(q), attn.k_norm(k)
        cos, sin = model.model.rotary_emb(x, positions[None])
        q, k = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    return q[0], k[0]


def reference_window_scores(q, k, window: int, pooling: str, kernel: int = 7) -> torch.Tensor:
    """DESIGN.md §3 one step at a time, in float64 Python loops -> [kv_heads, n - window].

    q: [heads, n_q >= window, d] whose last `window` rows are the window; k: [kv_heads, n, d].
    """
    heads, d = q.shape[0], q.shape[-1]
    kv_heads, n = k.shape[0], k.shape[1]
    group, prefix = heads // kv_heads, n - window
    out = torch.zeros(kv_heads, prefix, dtype=torch.float64)
    for head in range(heads):
        kv = head // group
        column = [0.0] * prefix  # attention each prefix key gets, summed over the window queries
        for w in range(window):
            query = q[head, q.shape[1] - window + w].double()
            visible = prefix + w + 1  # causal inside the window: window query w sees keys 0..prefix+w
            logits = torch.stack([query @ k[kv, j].double() / math.sqrt(d) for j in range(visible)])
            probs = (logits - logits.max()).exp()
            probs = (probs / probs.sum()).tolist()
            for j in range(prefix):
                column[j] += probs[j]
        for i in range(prefix):
            near = [column[j] for j in range(i - kernel // 2, i + kernel // 2 + 1) if 0 <= j < prefix]
            out[kv, i] += sum(near) / kernel if pooling == "avgpool" else max(near)
    return out


def assert_top_selection(kept: list[int], scores: list[float], window: int):
    """kept (sorted token indices) is the best-scored prefix tokens plus the window, up to exact ties."""
    prefix = len(scores)
    assert kept[len(kept) - window :] == list(range(prefix, prefix + window))
    chosen = kept[: len(kept) - window]
    assert chosen == sorted(set(chosen)) and all(0 <= i < prefix for i in chosen)
    others = [scores[i] for i in set(range(prefix)) - set(chosen)]
    assert min(scores[i] for i in chosen) >= max(others) - 1e-6


def default_sigint() -> None:
    """A shell without job control starts `cmd &` with SIGINT ignored, and children inherit that;
    the Ctrl-C tests must see fastkv as a terminal's foreground job would, however pytest was started."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def leftovers(folder: Path) -> list[str]:
    """Temp files or staging folders in `folder` (and below)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".*") if ".tmp" in p.name or "converting" in p.name)


def write_texts(texts: dict[str, str]) -> list[str]:
    """Each text written to a file of its name in the current folder -> the names, relative (a document's name
    is part of its prompt)."""
    for name, text in texts.items():
        Path(name).write_text(text)
    return list(texts)
