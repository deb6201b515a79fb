"""Build small PDF files in memory for tests: text pages, an encrypted one, a blank one."""

import io

from pypdf import PdfReader, PdfWriter


def _escape_pdf_string(text: str) -> str:
    """Escape a string for a PDF literal `( ... )` (backslash and parentheses)."""
    return text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")


def _content_stream(text: str) -> bytes:
    """A content stream that shows `text` in Helvetica, one `Tj` per line."""
    ops = ["BT", "/F1 12 Tf", "14 TL", "72 720 Td"]
    for line in text.split("\n"):
        ops.append(f"({_escape_pdf_string(line)}) Tj T*")
    ops.append("ET")
    return "\n".join(ops).encode("latin-1")


def _assemble(objects: list[bytes]) -> bytes:
    """Join numbered objects (1-based, object 1 is the catalog) into a PDF with a valid xref."""
    out = io.BytesIO()
    out.write(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(out.tell())
        out.write(b"%d 0 obj\n" % number + body + b"\nendobj\n")
    xref_at = out.tell()
    out.write(b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1))
    for offset in offsets:
        out.write(b"%010d 00000 n \n" % offset)
    out.write(b"trailer\n<< /Size %d /Root 1 0 R >>\n" % (len(objects) + 1))
    out.write(b"startxref\n%d\n%%%%EOF\n" % xref_at)
    return out.getvalue()


def _make_pdf(pages: list[str | None]) -> bytes:
    """A PDF with one page per entry: its text, or None for a page without a content stream."""
    # objects: 1 catalog, 2 page tree, 3 font, then per page: the page (+ its content stream)
    objects: list[bytes] = [
        b"",
        b"",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    page_refs = []
    for text in pages:
        page_number = len(objects) + 1
        page_refs.append(b"%d 0 R" % page_number)
        page = b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 3 0 R >> >>"
        if text is None:
            objects.append(page + b" >>")
            continue
        stream = _content_stream(text)
        objects.append(page + b" /Contents %d 0 R >>" % (page_number + 1))
        objects.append(b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream")
    objects[0] = b"<< /Type /Catalog /Pages 2 0 R >>"
    objects[1] = b"<< /Type /Pages /Kids [%s] /Count %d >>" % (
        b" ".join(page_refs),
        len(pages),
    )
    return _assemble(objects)


def make_text_pdf(pages: list[str]) -> bytes:
    """A PDF whose pages show the given texts (ASCII; a "\\n" starts a new line)."""
    return _make_pdf(list(pages))


def make_blank_pdf() -> bytes:
    """A one-page PDF whose page has no content stream, so no extractable text."""
    return _make_pdf([None])


def make_encrypted_pdf(user_password: str = "secret") -> bytes:
    """A two-page text PDF encrypted with RC4-128 (needs no crypto library to read or write).

    With the default non-empty user password it cannot be opened without that password; with
    `user_password=""` any reader can decrypt it.
    """
    plain = make_text_pdf(["Classified page one.", "Classified page two."])
    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(plain)))
    writer.encrypt(user_password=user_password, owner_password="owner", algorithm="RC4-128")
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()
