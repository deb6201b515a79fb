"""Helpers shared by the test modules: in-process CLI calls, the one-line error contract, documents, the HF forward."""

import hashlib

import torch
from typer.testing import CliRunner

from core.documents import Document
from fastkv_cli.app import app


def fastkv(*args, input: str | None = None):
    """`fastkv ARGS...` in this process (arguments may be paths or numbers)."""
    return CliRunner().invoke(app, [str(arg) for arg in args], input=input)


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
