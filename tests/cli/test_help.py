"""Every command's --help reads cleanly at 80 columns: plain metavars, no type noise, an example."""

import pytest

from tests.helpers import fastkv

COMMANDS = [["ask"], ["cache", "build"], ["cache", "query"], ["cache", "ask"], ["cache", "info"], ["serve"]]
USAGES = {"ask": "DOC... QUESTION", "query": "FILE.fkv [QUESTION...]", "build": "DOC...", "ask_cache": "CACHE..."}


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_help_reads_cleanly_at_80_columns(command, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    result = fastkv(*command, "--help")
    assert result.exit_code == 0, result.output
    text = result.stdout
    lines = text.splitlines()
    assert lines[0].startswith(f"Usage: fastkv {' '.join(command)} [OPTIONS]")
    assert all(len(line) <= 80 for line in lines), [line for line in lines if len(line) > 80]
    assert "<" not in text.replace("<=", ""), "a type like <bool> or <list[str]>"
    assert "{" not in lines[0]
    assert not any(line.rstrip().endswith(" .") for line in lines)
    assert "Example" in text


def test_usage_lines_show_plain_metavars(monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    assert "fastkv ask [OPTIONS] DOC... QUESTION" in fastkv("ask", "--help").stdout
    assert "FILE.fkv [QUESTION...]" in fastkv("cache", "query", "--help").stdout
    assert "CACHE... [QUESTION]" in fastkv("cache", "ask", "--help").stdout
    assert "--ray [ADDRESS]" in fastkv("cache", "build", "--help").stdout
    assert "--json " in fastkv("ask", "--help").stdout  # a flag: no metavar beside it
