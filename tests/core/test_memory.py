"""The memory estimate (core/memory.py) and the guard before a prefill: what it counts, that it refuses
with both numbers and what would fit, that --ignore-memory bypasses it, and (slow) that it
matches the peak RSS of a real prefill on CPU."""

import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import core.memory
from core.engine import Engine
from core.errors import MemoryLimitError
from core.generation import Decoding
from core.kvcache import full_kv_bytes
from core.memory import MemoryGuard, Sizes, estimate_prefill, mapped_bytes
from core.methods import METHODS, PauseAfter, make_method
from core.models import EMBEDDED_PACKAGE, load_model
from core.prompt import encode_question
from core.reconstruction import Probe
from core.runner import Runner
from tests.helpers import fastkv, make_document

QUESTION = "When was the lighthouse automated?"
DOC_TEXT = " ".join(f"In {1800 + i} the keeper logged {i} ships and {i % 7} storms." for i in range(12))
ROOT = Path(__file__).resolve().parents[2]


# --- the estimate ---------------------------------------------------------------------------------------


def test_weights_count_every_parameter_of_every_family(tiny_model):
    expected = sum(p.numel() for p in tiny_model.parameters())

    assert Sizes.of(tiny_model.config).parameters() == expected
    estimate = estimate_prefill(tiny_model.config, 100, make_method("fullkv"), torch.float32, "cpu")
    assert estimate.weights == expected * 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fullkv_cache_is_the_full_kv_plus_positions(tiny_model, dtype):
    config, tokens = tiny_model.config, 300
    estimate = estimate_prefill(config, tokens, make_method("fullkv"), dtype, "cpu")

    positions = 8 * config.num_key_value_heads * config.num_hidden_layers * tokens
    assert estimate.cache == full_kv_bytes(config, tokens, dtype) + positions


@pytest.mark.parametrize("name", [name for name in METHODS if name != "gemfilter"])
def test_the_methods_peak_cache_bounds_what_a_real_prefill_keeps(tiny_models, name):
    model = tiny_models["llama"]
    method = make_method(name, budget="20%") if name != "fullkv" else make_method(name)
    ids = torch.randint(0, model.config.vocab_size, (200,), generator=torch.Generator().manual_seed(0))

    probes = [Probe(ids, torch.arange(200))] if method.reconstructs else ()  # kvzip: the context repeated
    cache = Runner(model).prefill(ids, method, probes=probes).cache
    held = sum(layer.length for layer in cache.layers)  # slots, empty ones (adakv) included
    bound = method.peak_cache_tokens(200, model.config.num_hidden_layers)

    assert held <= bound
    # TSP layers may keep fewer than the budget, head-adaptive ones pad to their longest head only, and a budget
    # over the whole cache (kvzip's global) is held in full only until its selection at the end
    if not method.propagates and getattr(method, "head_budget", "uniform") == "uniform":
        assert held == bound


@pytest.mark.parametrize(
    "parameters", [{"head_budget": "adaptive"}, {"head_budget": "global"}, {"tsp_rate": "40%", "tsp_layer": 1}]
)
def test_kvzips_peak_cache_bounds_what_its_prefill_holds(tiny_models, parameters):
    model, layers = tiny_models["llama"], tiny_models["llama"].config.num_hidden_layers
    method = make_method("kvzip", budget="20%", **parameters)
    ids = torch.randint(0, model.config.vocab_size, (200,), generator=torch.Generator().manual_seed(0))
    held = []

    class Holding(type(method)):  # what each layer holds: all it saw until a deferred (global) selection ends
        def select(self, layer):
            selection = super().select(layer)
            kept = selection.keep is not None and selection.deferred is None
            held.append(selection.keep.shape[1] if kept else layer.present)
            return selection

    Runner(model).prefill(ids, Holding(**vars(method)), probes=[Probe(ids, torch.arange(200))])

    assert sum(held) <= method.peak_cache_tokens(200, layers)


def test_gemfilter_counts_the_first_pass_it_still_holds(tiny_models):
    layers = tiny_models["llama"].config.num_hidden_layers  # 4: the filter layer is 1
    method = make_method("gemfilter", budget="10%")

    assert method.peak_cache_tokens(1000, layers) == 2 * 1000 + layers * 100


def test_the_estimate_grows_with_the_prompt_and_shrinks_with_the_budget(tiny_models):
    config = tiny_models["qwen3"].config
    small, large = (estimate_prefill(config, n, make_method("fastkv"), torch.float32, "cpu") for n in (1000, 4000))
    tight = estimate_prefill(config, 4000, make_method("fastkv", budget="64"), torch.float32, "cpu")

    assert large.activations == pytest.approx(4 * small.activations, rel=0.01)
    assert large.beyond_weights > small.beyond_weights
    assert tight.cache < large.cache and tight.activations == large.activations


def test_cuda_float32_counts_the_math_paths_scores_but_half_precision_does_not(tiny_models):
    config, n = tiny_models["llama"].config, 4096
    cpu = estimate_prefill(config, n, make_method("fastkv"), torch.float32, "cpu")
    cuda32 = estimate_prefill(config, n, make_method("fastkv"), torch.float32, "cuda")
    cuda16 = estimate_prefill(config, n, make_method("fastkv"), torch.bfloat16, "cuda")

    heads = config.num_attention_heads
    assert cuda32.attention - cpu.attention >= 2 * 4 * heads * n * n
    assert cuda16.attention < n * n


def test_decoding_and_saving_are_counted(tiny_models):
    config = tiny_models["llama"].config
    plain = estimate_prefill(config, 500, make_method("fullkv"), torch.float32, "cpu")
    answered = estimate_prefill(config, 500, make_method("fullkv"), torch.float32, "cpu", new_tokens=2000)
    saved = estimate_prefill(config, 500, make_method("fullkv"), torch.float32, "cpu", saved_dtype=torch.float32)

    assert answered.decoding > 0 and answered.beyond_weights >= answered.cache + answered.decoding
    assert saved.saving >= 2 * full_kv_bytes(config, 500, torch.float32)
    assert plain.decoding == plain.saving == 0


def test_a_paused_build_counts_its_layers_and_the_hidden_states_it_holds(tiny_models):
    config, tokens = tiny_models["llama"].config, 1000
    layers, f16 = config.num_hidden_layers, torch.float16
    full = estimate_prefill(config, tokens, make_method("fullkv"), torch.float32, "cpu", saved_dtype=f16)

    paused = estimate_prefill(config, tokens, PauseAfter(layer=1), torch.float32, "cpu", saved_dtype=f16)

    hidden, positions = tokens * config.hidden_size, 4 * config.num_key_value_heads * tokens
    assert paused.cache == 2 * full.cache // layers + hidden * 4  # two layers' cache, and float32 hidden states
    # their float16 copy and its bytes: layer 1 without its positions (every token, not stored), layer 0 as the
    # int32 token ids it is rebuilt from
    assert paused.saving == full.saving // layers - 2 * positions + 2 * hidden * 2 + 2 * 4 * tokens
    assert paused.activations == full.activations  # the layers it runs see every token, as fullkv's


def test_memory_mapped_weights_are_counted_as_still_to_come(tiny_model_folder):
    mapped = load_model(str(tiny_model_folder.path), device="cpu", dtype="float32").model
    copied = load_model(str(tiny_model_folder.path), device="cpu", dtype="bfloat16").model

    weights = sum(p.nbytes for p in mapped.parameters())
    assert mapped_bytes(mapped.parameters()) == weights  # float32 file, float32 model: safetensors maps it
    assert mapped_bytes(copied.parameters()) == 0  # converted on load: anonymous memory, already counted
    guard = MemoryGuard.for_model(mapped)
    assert guard.mapped_weights == weights and guard.resident_weights == 0


# --- the guard --------------------------------------------------------------------------------------------


@pytest.fixture
def little_memory(monkeypatch):
    """The device has 1 MiB free (the tiny model's prefill needs more)."""
    monkeypatch.setattr(core.memory, "free_bytes", lambda device: 1 << 20)


@pytest.fixture
def doc(tmp_path) -> Path:
    path = tmp_path / "doc.txt"
    path.write_text(DOC_TEXT)
    return path


def assert_refused_for_memory(result) -> str:
    """Exit 1, one line on stderr giving what the prefill needs and what is free, and the override."""
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), result.exc_info
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith("error: the prefill of ") and "Traceback" not in result.output
    assert re.search(r"needs about [\d.,]+ [MG]iB more memory \(peak [\d.,]+ [MG]iB with the weights\)", line), line
    assert "but cpu has 1 MiB free" in line
    assert line.endswith("--ignore-memory tries anyway")
    return line


def test_ask_refuses_a_prefill_that_does_not_fit_naming_both_numbers(doc, tiny_model_folder, little_memory):
    result = fastkv("ask", doc, QUESTION, "--model", tiny_model_folder.path, "--max-new-tokens", 4)

    assert_refused_for_memory(result)
    assert result.stdout == ""


def test_ask_ignore_memory_skips_the_memory_check(doc, tiny_model_folder, little_memory):
    result = fastkv("ask", doc, QUESTION, "--model", tiny_model_folder.path, "--max-new-tokens", 4, "--ignore-memory")

    assert result.exit_code == 0, result.output
    assert result.stdout.strip()


def test_ask_has_no_force_flag_since_force_means_overwrite(doc, tiny_model_folder):
    result = fastkv("ask", doc, QUESTION, "--model", tiny_model_folder.path, "--force")

    assert result.exit_code == 2
    assert "--force" in result.stderr and result.stdout == ""


def test_build_refuses_and_ignore_memory_builds(doc, tiny_model_folder, little_memory, tmp_path):
    output = tmp_path / "c.fkv"
    args = ("cache", "build", doc, "-o", output, "--model", tiny_model_folder.path)

    assert_refused_for_memory(fastkv(*args))
    assert not output.exists() and list(tmp_path.glob(".*")) == []

    result = fastkv(*args, "--ignore-memory", "--quiet")
    assert result.exit_code == 0, result.output
    assert output.is_file()


def with_free_memory(monkeypatch, engine: Engine, free: int) -> MemoryGuard:
    guard = replace(MemoryGuard.for_model(engine.loaded.model), free=free)
    monkeypatch.setattr(MemoryGuard, "for_model", classmethod(lambda cls, model: guard))
    return guard


def prompt_tokens(engine: Engine, document) -> int:
    question = encode_question(engine.loaded.tokenizer, engine.template, QUESTION)
    return len(engine.context([document], 0, None).ids) + len(question)


def test_the_refusal_names_a_budget_and_a_truncation_that_fit(engine, monkeypatch):
    document = make_document([DOC_TEXT])
    tokens, decoding = prompt_tokens(engine, document), Decoding(max_new_tokens=4)
    real = MemoryGuard.for_model(engine.loaded.model)
    room = real.needed(real.estimate(tokens, make_method("snapkv", budget="30", window=8), new_tokens=4))
    with_free_memory(monkeypatch, engine, room)  # a 30-token budget fits; 90% does not

    with pytest.raises(MemoryLimitError) as error:  # (window 8: the smallest budget suggested is the window)
        engine.ask([document], QUESTION, make_method("snapkv", budget="90%", window=8), decoding)

    message = str(error.value)
    budget = int(re.search(r"--budget (\d+) fits", message)[1])
    assert 30 <= budget < int(0.9 * tokens)
    assert re.search(r"--truncate middle keeps [\d,]+ tokens", message)
    assert f"the prefill of {tokens:,} tokens" in message


def test_truncate_middle_cuts_the_documents_to_what_memory_allows(engine, monkeypatch):
    document = make_document([DOC_TEXT])
    method, decoding, fits = make_method("fullkv"), Decoding(max_new_tokens=4), 150
    assert prompt_tokens(engine, document) > fits + 50
    real = MemoryGuard.for_model(engine.loaded.model)
    with_free_memory(monkeypatch, engine, real.needed(real.estimate(fits, method, new_tokens=4)))

    with pytest.raises(MemoryLimitError):
        engine.ask([document], QUESTION, method, decoding)
    answer = engine.ask([document], QUESTION, method, decoding, truncate="middle")

    assert answer.stats.context_tokens == fits
    assert answer.stats.dropped_tokens == prompt_tokens(engine, document) - fits


def test_an_unknown_amount_of_free_memory_skips_the_check(engine, monkeypatch):
    monkeypatch.setattr(core.memory, "free_bytes", lambda device: None)

    assert MemoryGuard.for_model(engine.loaded.model) is None
    engine.ask([make_document([DOC_TEXT])], QUESTION, decoding=Decoding(max_new_tokens=1))


# --- against a real prefill (slow) ---------------------------------------------------------------------------

CHILD = """
import json, sys, torch
from pathlib import Path
from core.methods import make_method
from core.models import load_model
from core.runner import Runner

def status(key):
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(key + ":"))
    return int(line.split()[1]) * 1024

tokens, method = int(sys.argv[1]), sys.argv[2]
loaded = load_model(device="cpu", dtype="float32")
with torch.inference_mode():
    # Copy the memory-mapped weights into anonymous memory: file pages the kernel reclaims and faults back
    # in during the prefill would count as the prefill's.
    for parameter in loaded.model.parameters():
        parameter.data = parameter.data.clone()
runner = Runner(loaded.model)
runner.prefill(torch.arange(100, 164), make_method(method))  # one-time allocations (thread pools, kernels)
ids = torch.randint(100, loaded.config.vocab_size, (tokens,), generator=torch.Generator().manual_seed(0))
before = status("VmRSS")
Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
runner.prefill(ids, make_method(method))
print(json.dumps({"before": before, "peak": status("VmHWM")}))
"""


def measured_prefill_bytes(tokens: int, method: str, **env: str) -> int:
    """Peak RSS of one prefill in a fresh process, above its RSS just before (weights resident)."""
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(tokens), method],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env={**os.environ, **env},
    )
    assert result.returncode == 0, result.stderr
    rss = json.loads(result.stdout.splitlines()[-1])
    return rss["peak"] - rss["before"]


def embedded_estimate(tokens: int, method: str):
    config = load_model(device="cpu", dtype="float32").config
    return estimate_prefill(config, tokens, make_method(method), torch.float32, "cpu")


def mib(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


def real_prefill(test):
    """Slow: runs the embedded model in child processes and reads their peak RSS from Linux /proc."""
    for mark in (
        pytest.mark.slow,
        pytest.mark.skipif(importlib.util.find_spec(EMBEDDED_PACKAGE) is None, reason="the embedded model is missing"),
        pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to reset the peak"),
    ):
        test = mark(test)
    return test


@real_prefill
@pytest.mark.parametrize("method", ["fastkv", "fullkv"])
@pytest.mark.parametrize("tokens", [4096, 6144])
def test_what_the_prefill_holds_is_within_25_percent_of_its_peak_rss(tokens, method, record_property):
    """The estimate's cache + activations + attention against the peak RSS a prefill adds to a process
    whose weights are resident, with glibc's mmap threshold fixed (MALLOC_MMAP_THRESHOLD_) so that
    every freed tensor is returned at once: RSS then follows what is held, run after run. Whatever else
    the machine does can only add to a peak, so the smaller of two runs is the prefill's. CI once saw
    +17 MiB at 2K tokens (a 68 MiB estimate) in a single run: from 4K tokens on, such a fixed amount
    stays well inside the 25%."""
    estimate = embedded_estimate(tokens, method)

    measured = min(measured_prefill_bytes(tokens, method, MALLOC_MMAP_THRESHOLD_="65536") for _ in range(2))

    ratio = measured / estimate.held
    record_property("measured_over_estimate", round(ratio, 3))
    print(f"\n{method} {tokens} tokens, returning allocator: held {mib(estimate.held)}, measured {mib(measured)}")
    assert 0.75 <= ratio <= 1.25, f"measured {mib(measured)} vs estimated {mib(estimate.held)}"


@real_prefill
@pytest.mark.parametrize("tokens", [2048, 6144])
def test_the_guards_estimate_covers_the_peak_rss_with_the_default_allocator(tokens, record_property):
    """With glibc's defaults the same prefill's peak varies from run to run (freed blocks stay on the
    heap); the median of three lies between what is held and the guard's estimate (held + the
    allocator's allowance), within 25% above it at most."""
    estimate = embedded_estimate(tokens, "fastkv")

    measured = statistics.median(measured_prefill_bytes(tokens, "fastkv") for _ in range(3))

    record_property("measured_over_estimate", round(measured / estimate.beyond_weights, 3))
    print(
        f"\nfastkv {tokens} tokens, default allocator: held {mib(estimate.held)}, "
        f"guard {mib(estimate.beyond_weights)}, measured {mib(measured)}"
    )
    assert 0.9 * estimate.held <= measured <= 1.25 * estimate.beyond_weights, mib(measured)
