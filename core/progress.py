"""How core/ reports progress of long steps without printing: a callback the caller may pass."""

from typing import Protocol


class Progress(Protocol):
    def __call__(self, step: str, done: int, total: int) -> None:
        """`step` names what is running; `done` of `total` units are finished (total 0: unknown)."""


def no_progress(step: str, done: int, total: int) -> None:
    pass
