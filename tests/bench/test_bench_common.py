"""bench/common.py: a benchmark's section of docs/benchmarks.md is replaced whole, and its raw file says the same
command, date and machine as the section that links it."""

import json
from pathlib import Path

import common
import pytest
import torch


@pytest.fixture
def results(tmp_path, monkeypatch) -> Path:
    monkeypatch.setattr(common, "RESULTS", tmp_path / "benchmarks.md")
    monkeypatch.setattr(common, "RAW", tmp_path / "results")
    common.RESULTS.write_text("# Benchmarks\n\nKept text.\n")
    return tmp_path


def test_a_section_links_a_raw_file_with_its_command_date_and_machine(results):
    common.write_section("speed", "Speed", "| a |", torch.device("cpu"), None, raw=[{"tokens": 8, "ttft_s": 0.5}])

    text = common.RESULTS.read_text()
    raw = json.loads((results / "results" / "speed.json").read_text())
    assert raw["results"] == [{"tokens": 8, "ttft_s": 0.5}] and raw["reduced"] is None
    assert f"- Command: `{raw['command']}`" in text and f"- Machine: {raw['machine']}" in text
    assert f"- Date: {raw['date']}" in text
    assert "- Raw: [results/speed.json](results/speed.json)" in text
    assert "Kept text." in text


def test_a_rerun_replaces_its_section_and_raw_file_and_a_smoke_run_writes_no_raw_file(results):
    common.write_section("speed", "Speed", "first", torch.device("cpu"), None, raw={"run": 1})
    common.write_section("speed", "Speed", "second", torch.device("cpu"), "lengths 8", raw={"run": 2})
    common.write_section("gpu", "GPU", "smoke", torch.device("cpu"), "tiny", smoke=True, raw={"run": 3})

    text = common.RESULTS.read_text()
    assert "first" not in text and text.count("<!-- bench:speed -->") == 1 and "second" in text
    assert json.loads((results / "results" / "speed.json").read_text())["results"] == {"run": 2}
    assert not (results / "results" / "gpu.json").exists() and "Smoke run, not a result" in text
