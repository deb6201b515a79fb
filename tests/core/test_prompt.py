"""Prompt assembly: the chat template cut into pieces, page token spans, the overflow policy."""

import pytest

from core.documents import Document
from core.errors import ContextOverflowError, InputError
from core.prompt import PromptTemplate, encode_context, encode_question, fit_context
from tests.tiny_models import build_tiny_tokenizer

PAGES = [
    "The keeper logged 41 ships in March.",
    "Page two: Ada Lindqvist (1921-1958) kept the light.",
    "Final page.\nThe lamp burned paraffin until 1962.",
]
SYSTEM_TEMPLATE = (  # like SmolLM2's: a default system turn when the conversation has none
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def document(name: str, pages: list[str]) -> Document:
    spans, start = [], 0
    for page in pages:
        spans.append((start, start + len(page)))
        start += len(page) + 2
    return Document(name, "\n\n".join(pages), "0" * 64, start, tuple(spans))


@pytest.fixture
def template(tiny_tokenizer) -> PromptTemplate:
    return PromptTemplate.for_tokenizer(tiny_tokenizer)


def long_document(words: int) -> Document:
    return document("long.txt", [" ".join(f"w{i}" for i in range(words))])


@pytest.mark.parametrize("chat_template", ["chatml", "with-system-turn"])
def test_template_pieces_reassemble_to_the_tokenizers_own_chat_template(chat_template):
    tokenizer = build_tiny_tokenizer()
    if chat_template == "with-system-turn":
        tokenizer.chat_template = SYSTEM_TEMPLATE
    template = PromptTemplate.for_tokenizer(tokenizer)
    docs, question = "Alpha.\n\nBeta gamma.", "What comes after alpha?"

    prompt = template.head + docs + template.separator + template.question_text(question)

    expected = tokenizer.apply_chat_template(
        [{"role": "user", "content": f"{docs}\n\nQuestion: {question}"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt == expected
    assert template.tail.endswith("<|im_start|>assistant\n")  # the answer follows the generation prompt


def test_without_a_chat_template_the_prompt_is_plain_text():
    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = None
    template = PromptTemplate.for_tokenizer(tokenizer)

    assert template.head + "Doc." + template.separator + template.question_text("Why?") == (
        "Doc.\n\nQuestion: Why?\nAnswer:"
    )


def test_page_token_spans_point_at_each_pages_text(tiny_tokenizer, template):
    doc = document("report.pdf", PAGES)

    context = encode_context(tiny_tokenizer, template, [doc])

    assert len(context.page_token_spans) == 1
    decoded = [tiny_tokenizer.decode(context.ids[a:b]) for a, b in context.page_token_spans[0]]
    assert decoded == PAGES
    assert context.tokens_per_document == [sum(b - a for a, b in context.page_token_spans[0])]
    assert "Document 1" not in tiny_tokenizer.decode(context.ids)  # a single document gets no header
    assert tiny_tokenizer.decode(context.ids).endswith(PAGES[-1] + template.separator)


def test_several_documents_get_a_header_naming_each(tiny_tokenizer, template):
    docs = [document("report.pdf", PAGES), document("notes.txt", ["Second document body."])]

    context = encode_context(tiny_tokenizer, template, docs)

    text = tiny_tokenizer.decode(context.ids)
    first, second = text.index("Document 1: report.pdf"), text.index("Document 2: notes.txt")
    assert first < text.index(PAGES[0]) < second < text.index("Second document body.")
    assert [[tiny_tokenizer.decode(context.ids[a:b]) for a, b in pages] for pages in context.page_token_spans] == [
        PAGES,
        ["Second document body."],
    ]
    # the header is not counted as the document's tokens
    header_end = context.page_token_spans[1][0][0]
    assert "notes.txt" in tiny_tokenizer.decode(context.ids[context.page_token_spans[0][-1][1] : header_end])


def test_overflow_is_an_error_with_both_token_counts(tiny_tokenizer, template):
    context = encode_context(tiny_tokenizer, template, [long_document(400)])
    window, extra = 1024, 30
    room = len(context.ids) - 5

    with pytest.raises(ContextOverflowError) as caught:
        fit_context(context, room, window, extra, truncate=None)

    message = str(caught.value)
    assert f"{len(context.ids) + extra:,} tokens" in message
    assert f"{window:,}" in message
    assert "--truncate middle" in message


def test_context_that_fits_is_unchanged(tiny_tokenizer, template):
    context = encode_context(tiny_tokenizer, template, [long_document(50)])

    assert fit_context(context, len(context.ids), 1024, 10, truncate=None) is context
    assert fit_context(context, len(context.ids), 1024, 10, truncate="middle") is context


def test_truncate_middle_drops_exactly_the_overflow_from_the_documents_middle(tiny_tokenizer, template):
    docs = [document("a.txt", [" ".join(f"a{i}" for i in range(120))]), long_document(300)]
    context = encode_context(tiny_tokenizer, template, docs)
    overflow = 137
    room = len(context.ids) - overflow

    fitted = fit_context(context, room, 4096, 40, truncate="middle")

    assert len(fitted.ids) == room
    assert fitted.dropped_tokens == overflow
    # one contiguous cut: a common prefix and suffix that together are everything kept
    cut = next(i for i, (a, b) in enumerate(zip(fitted.ids, context.ids, strict=False)) if a != b)
    assert fitted.ids == context.ids[:cut] + context.ids[cut + overflow :]
    # the cut lies in the middle of the documents, so both their head and their tail survive
    docs_start, docs_end = context.page_token_spans[0][0][0], context.page_token_spans[-1][-1][1]
    head_kept, tail_kept = cut - docs_start, docs_end - (cut + overflow)
    assert abs(head_kept - tail_kept) <= 1
    text = tiny_tokenizer.decode(fitted.ids)
    assert text.startswith(template.head + "Document 1: a.txt\n\na0 a1 a2")
    assert text.endswith("w297 w298 w299" + template.separator)
    # spans still point inside the shortened ids and still end each document
    assert fitted.page_token_spans[-1][-1][1] == docs_end - overflow
    assert sum(fitted.tokens_per_document) == sum(context.tokens_per_document) - overflow


def test_truncate_middle_refuses_when_nothing_of_the_documents_would_remain(tiny_tokenizer, template):
    context = encode_context(tiny_tokenizer, template, [long_document(20)])

    with pytest.raises(ContextOverflowError, match="no room for the documents"):
        fit_context(context, 3, 64, 61, truncate="middle")


def test_unknown_truncate_mode_is_an_input_error(tiny_tokenizer, template):
    context = encode_context(tiny_tokenizer, template, [long_document(50)])

    with pytest.raises(InputError, match="unknown --truncate mode 'start'"):
        fit_context(context, len(context.ids) - 10, 1024, 10, truncate="start")


@pytest.mark.parametrize("question", ["", "   ", "\n\t"])
def test_empty_question_is_an_input_error(tiny_tokenizer, template, question):
    with pytest.raises(InputError, match="empty"):
        encode_question(tiny_tokenizer, template, question)


def test_question_is_stripped_and_ends_with_the_generation_prompt(tiny_tokenizer, template):
    ids = encode_question(tiny_tokenizer, template, "  When was it built?\n")

    assert tiny_tokenizer.decode(ids) == "Question: When was it built?<|im_end|>\n<|im_start|>assistant\n"
