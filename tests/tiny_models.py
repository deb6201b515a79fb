"""Builders for tiny random-weight models, a tiny tokenizer and saved model folders (fixtures: conftest.py)."""

import shutil
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

# 4 layers, 4 query heads sharing 2 KV heads (GQA groups of 2), head_dim 16. A wide init keeps the
# logits around unit scale, so a wrong mask or position shows up far above fp32 rounding.
TINY_SIZES = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=1024,
    initializer_range=0.2,
    # no special tokens: HF's generate then never stops early, so decoding compares token for token
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)

FAMILIES = {
    "llama": lambda: LlamaConfig(**TINY_SIZES),
    "mistral": lambda: MistralConfig(**TINY_SIZES, sliding_window=None),
    "qwen2": lambda: Qwen2Config(**TINY_SIZES),  # biases on q/k/v
    "qwen3": lambda: Qwen3Config(**TINY_SIZES),  # q/k RMS norms per head
    # Llama 3.x rope scaling: the runner must reuse the model's own rotary module, not recompute RoPE
    "llama3-rope": lambda: LlamaConfig(
        **TINY_SIZES,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
}

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TOKENIZER_CORPUS = [
    "The Harrow Point lighthouse was automated in 1987, after a century of keepers.",
    "Thomas Arkwright Bell designed the tower; the light was first exhibited in November 1871.",
    "The keeper logged the ships, the storms and the oil burned by the lamp every night.",
    "Question: In which year was the station switched from colza oil to paraffin?",
    "Answer the question about the documents below. Document one, document two, page three.",
]
CLI_WINDOW = 512  # max_position_embeddings of the saved CLI model: small, so overflow is cheap to provoke
BUILD_WINDOW = 1024  # a saved model's window that leaves `cache build` room for a later question


def build_tiny_model(family: str, seed: int = 0):
    """A float32 eval-mode model of `family` (a key of FAMILIES) with seeded random weights."""
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(FAMILIES[family](), dtype=torch.float32).eval()


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE (any UTF-8 text encodes, offsets are exact) with a ChatML-style template."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(TOKENIZER_CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
    )


def save_tiny_llama(folder: Path, tokenizer: PreTrainedTokenizerFast, window: int = CLI_WINDOW) -> None:
    """Save a tiny Llama + `tokenizer` that `--model folder` loads in well under a second.

    Its end-of-turn logit is always 0 while the others spread around it, so an answer never
    stops early and always has its full --max-new-tokens.
    """
    config = LlamaConfig(
        **{
            **TINY_SIZES,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": window,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        }
    )
    torch.manual_seed(1234)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight[tokenizer.eos_token_id] = 0
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def save_slow_llama(folder: Path, tokenizer: PreTrainedTokenizerFast, window: int, endless: bool = False) -> Path:
    """A Llama slow enough to interrupt on CPU (6 layers, 256 wide) with a `window`-token context: a long prefill
    takes seconds. `endless`: it never predicts the end of the answer, so an answer runs to its token limit."""
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=256, intermediate_size=1024, num_hidden_layers=6,
        num_attention_heads=8, num_key_value_heads=2, head_dim=32, max_position_embeddings=window,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    if endless:
        with torch.no_grad():
            model.lm_head.weight[tokenizer.eos_token_id] = 0
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def save_tiny_gpt2(folder: Path, tokenizer: PreTrainedTokenizerFast) -> None:
    """A complete tiny GPT-2 folder: loadable by transformers, refused by fastkv."""
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=64)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def fastkv_command() -> list[str]:
    """The installed `fastkv` script of this interpreter's environment (else the app run by this Python)."""
    script = shutil.which("fastkv", path=str(Path(sys.executable).parent)) or shutil.which("fastkv")
    return [script] if script else [sys.executable, "-c", "from fastkv_cli.app import app; app()"]
