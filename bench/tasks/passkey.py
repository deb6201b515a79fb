"""Passkey retrieval: a random number hidden at a controlled depth of real filler text, at several prompt lengths."""

import math
import random

from common import real_text

from core.prompt import PromptTemplate, encode_question
from tasks import Item, half_of, text_document

DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)  # where the key sits in the filler: start ... end
INTRO = "There is a pass key hidden inside a lot of irrelevant text. Find it and remember it.\n\n"
NEEDLE = "\n\nThe pass key is {key}. Remember it. {key} is the pass key.\n\n"
QUESTION = "What is the pass key? Answer with the number only."
SLACK = 8  # tokens left spare: re-tokenising at the cut points can merge or split a few


def passkey(length: int, depth: float) -> str:
    """A 5-6 digit key, the same for the same length and depth in every run."""
    return str(random.Random(f"passkey {length} {depth}").randrange(10_000, 1_000_000))


def count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def insert_at_depth(filler: str, needle: str, depth: float) -> str:
    """`needle` at the start of the line `depth` of the way through `filler` (1.0: after all of it)."""
    cut = len(filler) if depth >= 1 else filler.rfind("\n", 0, round(depth * len(filler))) + 1
    return filler[:cut] + needle + filler[cut:]


def items(tokenizer, template: PromptTemplate, lengths: list[int]) -> list[Item]:
    """One item per depth and length, depth-major so that a --limit still spans the lengths.

    Each whole prompt (chat template, intro, filler, key sentence, question) is about `length` tokens.
    """
    filler_ids = tokenizer(real_text(), add_special_tokens=False)["input_ids"]
    question = len(encode_question(tokenizer, template, QUESTION))
    frame = count(tokenizer, template.head + INTRO + template.separator) + question + SLACK
    result = []
    for d, depth in enumerate(DEPTHS):
        for length in lengths:
            key = passkey(length, depth)
            needle = NEEDLE.format(key=key)
            filler = tokenizer.decode(filler_ids[: length - frame - count(tokenizer, needle)])
            name = f"passkey {length} @{depth:.0%}"
            document = text_document(name, INTRO + insert_at_depth(filler, needle, depth))
            half = half_of(d + round(math.log2(length)))  # fixed per item, whichever lengths a run asks for
            result.append(Item("passkey", name, document, QUESTION, (key,), length, half))
    return result
