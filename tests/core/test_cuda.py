"""On a CUDA device the runner still equals the HF model, and fastkv with nothing to drop equals fullkv.

Skipped without CUDA; run on a GPU machine with `pytest tests/core/test_cuda.py`. The CPU suite proves the
same properties in depth; these check that nothing in the CUDA path (device placement, SDPA's CUDA
kernels, bfloat16) changes them.
"""

import pytest
import torch

from core.generation import generate
from core.methods import make_method
from core.runner import Runner
from tests.helpers import hf_last_logits, random_ids
from tests.tiny_models import FAMILIES, build_tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

FP32_TOL = 1e-3  # CUDA kernels sum in another order than the HF forward's


@pytest.fixture(params=list(FAMILIES))
def family(request) -> str:
    return request.param


def cuda_model(family: str, dtype: torch.dtype = torch.float32):
    return build_tiny_model(family).to("cuda", dtype)


def test_prefill_and_appended_question_equal_the_hf_forward(family):
    model = cuda_model(family)
    context, question = random_ids(300, 256, seed=1).cuda(), random_ids(9, 256, seed=2).cuda()
    runner = Runner(model)

    prefill = runner.prefill(context)
    after_question = runner.extend(prefill.cache, question)

    assert prefill.logits.device.type == "cuda"
    assert (prefill.logits - hf_last_logits(model, context)).abs().max() < FP32_TOL
    whole = hf_last_logits(model, torch.cat([context, question]))
    assert (after_question - whole).abs().max() < FP32_TOL


def test_greedy_decode_equals_hf_generate(family):
    model, steps = cuda_model(family), 8
    ids = random_ids(50, 256, seed=3).cuda()
    runner = Runner(model)
    prefill = runner.prefill(ids)

    tokens = generate(runner, prefill.cache, prefill.logits, steps, stop_ids=set())

    with torch.inference_mode():
        out = model.generate(
            ids.unsqueeze(0), attention_mask=torch.ones_like(ids).unsqueeze(0),
            do_sample=False, max_new_tokens=steps, min_new_tokens=steps,
        )  # fmt: skip
    assert tokens == out[0, ids.shape[0] :].tolist()


def test_fastkv_that_keeps_everything_equals_fullkv(family):
    model = cuda_model(family)
    ids = random_ids(300, 256, seed=4).cuda()
    runner = Runner(model)

    full = runner.prefill(ids)
    fast = runner.prefill(ids, make_method("fastkv", budget="100%", tsp_rate="1.0"))

    assert (fast.logits - full.logits).abs().max() < 1e-4
    for kept, whole in zip(fast.cache.layers, full.cache.layers, strict=True):
        assert torch.equal(kept.positions, whole.positions)
        assert (kept.keys - whole.keys).abs().max() < 1e-4


def test_bfloat16_prefill_stays_close_to_the_hf_forward(family):
    model = cuda_model(family, torch.bfloat16)
    ids = random_ids(300, 256, seed=5).cuda()

    logits = Runner(model).prefill(ids).logits

    expected = hf_last_logits(model, ids)
    assert logits.dtype == torch.float32
    assert (logits - expected).abs().max() < 0.05 * expected.abs().max()  # bfloat16 rounding, not a wrong mask


def test_fastkv_at_a_budget_keeps_the_budget_on_the_gpu(family):
    model = cuda_model(family)
    n = 400
    ids = random_ids(n, 256, seed=6).cuda()

    prefill = Runner(model).prefill(ids, make_method("fastkv", budget="20%"))

    for layer in prefill.cache.layers:
        assert layer.keys.device.type == "cuda"
        assert layer.length == n // 5
        assert bool((layer.positions.diff(dim=1) > 0).all())
        assert bool((layer.positions[:, -8:] == torch.arange(n - 8, n, device="cuda")).all())
