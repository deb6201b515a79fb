"""Questions the CLI reads itself: a --questions file, or one per line from stdin."""

import sys
from pathlib import Path

from core.errors import InputError


def read_questions(path: Path) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"{path}: cannot read the questions file ({error})") from None
    questions = [line.strip() for line in lines if line.strip()]
    if not questions:
        raise InputError(f"{path}: no questions in the file")
    return questions


def stdin_questions():
    """One question per non-empty line of stdin, until EOF (a closed stdin has none)."""
    stream = getattr(sys.stdin, "buffer", None)
    if stream is None:
        return
    number = 0
    try:
        for line in stream:
            number += 1
            if question := line.decode("utf-8").strip():
                yield question
    except UnicodeDecodeError:
        raise InputError(f"<stdin>: line {number} is not UTF-8 text") from None
    except OSError as error:
        raise InputError(f"<stdin>: cannot read questions ({error.strerror or error})") from None
