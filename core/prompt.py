"""Chat-template assembly of documents and a question, with token accounting and the overflow policy."""

from bisect import bisect_left
from dataclasses import dataclass

from core.documents import Document
from core.errors import ContextOverflowError, InputError

DOCS_MARK, QUESTION_MARK = "\x00DOCUMENTS\x00", "\x00QUESTION\x00"
USER_MESSAGE = f"{DOCS_MARK}\n\nQuestion: {QUESTION_MARK}"
TRUNCATE_MODES = ("middle",)


@dataclass(frozen=True)
class PromptTemplate:
    """The model's chat template cut around the documents and the question.

    A prompt is `head + documents + separator + question_prefix + question + tail`; the context a
    cache holds ends after `separator`, so a question can be appended to it later.
    """

    head: str
    separator: str
    question_prefix: str
    tail: str

    @classmethod
    def for_tokenizer(cls, tokenizer) -> "PromptTemplate":
        if tokenizer.chat_template:
            messages = [{"role": "user", "content": USER_MESSAGE}]
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:
            text = f"{USER_MESSAGE}\nAnswer:"
        head, rest = text.split(DOCS_MARK)
        middle, tail = rest.split(QUESTION_MARK)
        separator, question_prefix = middle.split("Question: ")
        return cls(head, separator, "Question: " + question_prefix, tail)

    def question_text(self, question: str) -> str:
        return f"{self.question_prefix}{question}{self.tail}"


def documents_text(documents: list[Document]) -> tuple[str, list[list[tuple[int, int]]]]:
    """Join documents (with a header naming each when there are several) -> text, page char spans."""
    parts, spans, offset = [], [], 0
    for i, doc in enumerate(documents):
        header = f"Document {i + 1}: {valid_text(doc.name)}\n\n" if len(documents) > 1 else ""
        if i:
            parts.append("\n\n")
            offset += 2
        body_start = offset + len(header)
        spans.append([(body_start + a, body_start + b) for a, b in doc.page_spans])
        parts.append(header + doc.text)
        offset += len(header) + len(doc.text)
    return "".join(parts), spans


@dataclass
class Context:
    ids: list[int]  # the prompt up to and including the separator: what a cache holds
    page_token_spans: list[list[tuple[int, int]]]  # per document, per page: [start, end) into ids
    dropped_tokens: int = 0  # removed from the middle of the documents by --truncate middle
    dropped_estimated: bool = False  # part of them was skipped unread by the tokenizer: counted from its size

    @property
    def tokens_per_document(self) -> list[int]:
        return [sum(end - start for start, end in pages) for pages in self.page_token_spans]


def encode_context(tokenizer, template: PromptTemplate, documents: list[Document]) -> Context:
    """Tokenize head + documents + separator, keeping where each page's tokens lie."""
    text, char_spans = documents_text(documents)
    prefix = len(template.head)
    encoded = tokenizer(
        template.head + text + template.separator, add_special_tokens=False, return_offsets_mapping=True
    )
    starts = [start for start, _ in encoded["offset_mapping"]]
    token_spans = [
        [(bisect_left(starts, prefix + a), bisect_left(starts, prefix + b)) for a, b in pages] for pages in char_spans
    ]
    skipped = sum(doc.skipped_tokens for doc in documents)
    return Context(list(encoded["input_ids"]), token_spans, skipped, dropped_estimated=skipped > 0)


def check_truncate(truncate: str | None) -> None:
    if truncate is not None and truncate not in TRUNCATE_MODES:
        raise InputError(f"unknown --truncate mode '{truncate}' (choose from {', '.join(TRUNCATE_MODES)})")


def valid_text(text: str) -> str:
    """`text` with undecodable bytes (surrogate escapes from a non-UTF-8 path or argument) as U+FFFD."""
    return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


def encode_question(tokenizer, template: PromptTemplate, question: str) -> list[int]:
    question = question.strip()
    if not question:
        raise InputError("the question is empty")
    if valid_text(question) != question:
        raise InputError("the question is not UTF-8 text")
    return tokenizer(template.question_text(question), add_special_tokens=False)["input_ids"]


def fit_context(context: Context, room: int, window: int, extra: int, truncate: str | None) -> Context:
    """Check the context fits in `room` tokens; with truncate="middle", cut the documents' middle.

    `extra` (question + answer tokens) and `window` only shape the error message.
    """
    check_truncate(truncate)
    overflow = len(context.ids) - room
    if overflow <= 0:
        return context
    if truncate is None:
        raise ContextOverflowError(
            f"the prompt needs {len(context.ids) + extra:,} tokens ({len(context.ids):,} of documents and "
            f"{extra:,} for the question and answer) but the model's window is {window:,}; "
            f"pass --truncate middle to drop {overflow:,} tokens from the middle of the documents"
        )
    first = context.page_token_spans[0][0][0]
    last = context.page_token_spans[-1][-1][1]
    if last - first <= overflow:
        raise ContextOverflowError(
            f"the question and answer alone ({extra:,} tokens) leave no room for the documents in the "
            f"model's window of {window:,} tokens"
        )
    cut_start = first + (last - first - overflow) // 2
    cut_end = cut_start + overflow

    def moved(t: int) -> int:
        return t if t <= cut_start else max(cut_start, t - overflow)

    ids = context.ids[:cut_start] + context.ids[cut_end:]
    spans = [[(moved(a), moved(b)) for a, b in pages] for pages in context.page_token_spans]
    return Context(ids, spans, context.dropped_tokens + overflow, context.dropped_estimated)
