"""How many tokens the documents may take, and counting them as they are read, without tokenizing them whole."""

from collections.abc import Callable
from dataclasses import dataclass

PIECE_CHARS = 1 << 12  # text tokenized at a time while counting (about a thousand tokens)
FORCED_PIECE_CHARS = 1 << 17  # text with no safe cut this long is cut anyway ...
FORCED_CUT_SLACK = 8  # ... and that cut may have added this many tokens (measured: 1 or 2)


@dataclass(frozen=True)
class TokenLimit:
    """How many tokens the model's window leaves for the documents, so that reading stops as soon as
    they certainly cannot fit (or, with truncate="middle", keeps only the head and tail that could).

    Memory and time then follow the window, not the input's size (DESIGN.md §12).
    """

    room: int  # tokens left for the documents' text
    count: Callable[[str], int]  # the model tokenizer's token count of a text
    longest_token: int  # characters of the longest vocabulary entry: no token covers more
    window: int  # the model's window, for the message
    extra: int  # tokens for the question and answer, for the message
    truncate: str | None = None  # "middle": keep a head and a tail of `room` tokens each


def safe_cut(text: str, end: int) -> int:
    """The last index before `end` where `text` has a single space between two non-spaces (0: none).

    Cutting there is where byte-level BPE (GPT-2, Llama 3, Qwen regexes) and Metaspace tokenizers cut
    anyway, so the two sides' token counts add up to the whole's (measured on the embedded and the test
    tokenizers, tests/core/test_bounded.py).
    """
    at = text.rfind(" ", 0, end)
    while at > 0:
        if at + 1 < len(text) and not text[at - 1].isspace() and not text[at + 1].isspace():
            return at
        at = text.rfind(" ", 0, at)
    return 0


class TokenTally:
    """A lower bound on the tokens of a text that arrives in parts, without tokenizing it whole.

    Pieces are cut at `safe_cut` points and tokenized alone; where no such point comes for
    FORCED_PIECE_CHARS, the piece is cut anyway and FORCED_CUT_SLACK tokens are taken off the count
    (a cut inside a word adds a token or two, it never saves one: measured). A tokenizer that adds
    tokens at the start of each call (a SentencePiece dummy prefix) is probed, and that is taken off
    each cut too.
    """

    def __init__(self, count: Callable[[str], int]):
        self.count, self.pending, self.tokens, self.chars, self.cuts = count, "", 0, 0, 0
        self.per_cut = max(count("a") + count(" a") - count("a a"), 0)
        self.forced = 0

    def feed(self, text: str) -> None:
        self.pending += text
        while len(self.pending) >= PIECE_CHARS:
            cut = safe_cut(self.pending, len(self.pending))
            if cut == 0 and len(self.pending) < FORCED_PIECE_CHARS:
                return
            self.forced += cut == 0
            self._count(self.pending[: cut or None])
            self.pending = self.pending[cut:] if cut else ""

    def flush(self) -> None:
        if self.pending:
            self._count(self.pending)
            self.pending = ""

    def _count(self, piece: str) -> None:
        self.tokens += self.count(piece)
        self.chars += len(piece)
        self.cuts += 1

    @property
    def at_least(self) -> int:
        """Tokens the text fed so far certainly has (its uncounted end adds none)."""
        slack = self.forced * FORCED_CUT_SLACK + max(self.cuts - 1, 0) * self.per_cut
        return max(self.tokens - slack, 0)

    def estimate(self, chars: int) -> int:
        """About how many tokens `chars` more characters of such text hold."""
        return round(chars * self.tokens / self.chars) if self.chars else 0
