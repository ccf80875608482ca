"""apb_core.documents: every kind of input becomes a Document or one InputError line, and files stay untouched.

PDF fixtures are built here: `make_text_pdf` writes a minimal valid PDF (Helvetica, one `BT ... Tj ET` text
object per page) by hand, because pypdf can write pages but not lay out text.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pypdf import PdfReader, PdfWriter

from apb_core.documents import MAX_INVALID_FRACTION, PAGE_SEPARATOR, Document, read_document
from apb_core.errors import InputError


def make_text_pdf(pages: list[str]) -> bytes:
    """A valid PDF with one line of Helvetica text per page (the text must be Latin-1)."""
    kids = " ".join(f"{4 + 2 * i} 0 R" for i in range(len(pages)))
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        f"<< /Type /Pages /Kids [{kids}] /Count {len(pages)} >>".encode(),
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    for i, text in enumerate(pages):
        escaped = text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
        stream = f"BT /F1 12 Tf 72 720 Td ({escaped}) Tj ET".encode("latin-1")
        objects.append(
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
            b"/Resources << /Font << /F1 3 0 R >> >> /Contents %d 0 R >>" % (5 + 2 * i)
        )
        objects.append(b"<< /Length %d >>\nstream\n%s\nendstream" % (len(stream), stream))
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref_at = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    for offset in offsets:
        out += b"%010d 00000 n \n" % offset
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref_at)
    return bytes(out)


def make_blank_pdf(pages: int = 2) -> bytes:
    """A PDF whose pages have no text layer, like a scan."""
    writer = PdfWriter()
    for _ in range(pages):
        writer.add_blank_page(612, 792)
    buf = io.BytesIO()
    writer.write(buf)
    return buf.getvalue()


def make_encrypted_pdf(user_password: str) -> bytes:
    """`make_text_pdf(["Locked text."])` encrypted with RC4-128 (pure Python in pypdf, no `cryptography`)."""
    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(make_text_pdf(["Locked text."]))))
    writer.encrypt(user_password, owner_password="owner-secret", algorithm="RC4-128")
    buf = io.BytesIO()
    writer.write(buf)
    return buf.getvalue()


def write(tmp_path: Path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def read_refused(path: str) -> str:
    """Read `path`, expect InputError, and return its (single-line) message."""
    with pytest.raises(InputError) as info:
        read_document(path)
    message = str(info.value)
    assert message and "\n" not in message
    return message


# -- text ----------------------------------------------------------------------------------------------------
def test_utf8_text_is_read_verbatim(tmp_path: Path) -> None:
    text = "Grüße aus Köln — naïve café ☕\nsecond line\n"
    doc = read_document(write(tmp_path, "doc.txt", text.encode("utf-8")))
    assert doc == Document(text=text, source=str(tmp_path / "doc.txt"), pages=None, warnings=[])


def test_markdown_and_unknown_suffix_are_text(tmp_path: Path) -> None:
    assert read_document(write(tmp_path, "a.md", b"# Title\n\nbody")).text == "# Title\n\nbody"
    assert read_document(write(tmp_path, "notes.log", b"plain")).text == "plain"
    assert read_document(write(tmp_path, "README", b"no suffix")).text == "no suffix"


def test_bom_dropped_and_crlf_normalised(tmp_path: Path) -> None:
    doc = read_document(write(tmp_path, "win.txt", b"\xef\xbb\xbfline one\r\nline two\r\n"))
    assert doc.text == "line one\nline two\n"
    assert doc.warnings == []


def test_utf16_with_bom_is_decoded(tmp_path: Path) -> None:
    doc = read_document(write(tmp_path, "u16.txt", "Hello UTF-16 wörld".encode("utf-16")))
    assert doc.text == "Hello UTF-16 wörld"
    assert len(doc.warnings) == 1 and "UTF-16" in doc.warnings[0]


def test_few_invalid_bytes_are_replaced_with_a_warning(tmp_path: Path) -> None:
    # A Latin-1 file: 2 non-ASCII bytes among ~60 are well under the 10% limit.
    data = "The café serves crème brûlée on Sundays only.".encode("latin-1")
    bad = sum(b >= 0x80 for b in data)
    assert 0 < bad <= MAX_INVALID_FRACTION * len(data)
    doc = read_document(write(tmp_path, "latin1.txt", data))
    assert doc.text == "The caf\ufffd serves cr\ufffdme br\ufffdl\ufffde on Sundays only."
    assert len(doc.warnings) == 1
    assert f"{bad} invalid UTF-8 byte(s)" in doc.warnings[0]
    assert "byte offset 7" in doc.warnings[0]


def test_mostly_invalid_utf8_is_refused(tmp_path: Path) -> None:
    data = "éàüöçñøåæ".encode("latin-1") * 20  # every byte invalid UTF-8
    assert "not UTF-8" in read_refused(write(tmp_path, "latin1.txt", data))


@pytest.mark.parametrize(
    ("name", "data", "expected"),
    [
        ("empty.txt", b"", "empty"),
        ("blank.txt", b"  \n\t \r\n  ", "only whitespace"),
        ("blank_bom.txt", b"\xef\xbb\xbf \n", "only whitespace"),
        ("nul.txt", b"hello\x00world", "binary"),
        ("image.png", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)), "binary"),
        ("controls.txt", b"text \x01\x02\x03\x04\x05\x06 more", "binary"),
        ("random.bin", bytes((i * 193 + 7) % 256 for i in range(4096)), "binary"),
    ],
)
def test_unusable_text_is_refused(tmp_path: Path, name: str, data: bytes, expected: str) -> None:
    assert expected in read_refused(write(tmp_path, name, data))


def test_missing_path_and_directory(tmp_path: Path) -> None:
    assert "no such file" in read_refused(str(tmp_path / "missing.txt"))
    assert "directory" in read_refused(str(tmp_path))
    assert "no such file" in read_refused(str(tmp_path / "missing" / "x.txt"))
    assert read_refused("")


def test_stdin_text_and_pdf() -> None:
    doc = read_document("-", stdin=io.BytesIO(b"from a pipe\n"))
    assert (doc.text, doc.source, doc.pages) == ("from a pipe\n", "<stdin>", None)
    pdf = read_document("-", stdin=io.BytesIO(make_text_pdf(["Piped PDF."])))
    assert (pdf.text, pdf.pages) == ("Piped PDF.", 1)
    with pytest.raises(InputError, match="<stdin>: the document is empty"):
        read_document("-", stdin=io.BytesIO(b""))


# -- PDF -----------------------------------------------------------------------------------------------------
def test_pdf_pages_are_joined_in_order_with_separator(tmp_path: Path) -> None:
    pages = ["First page (one).", "Second page.", "Third page."]
    doc = read_document(write(tmp_path, "doc.pdf", make_text_pdf(pages)))
    assert doc.pages == 3
    assert doc.text == (
        "First page (one)." + "\n\n--- page 2 ---\n\n" + "Second page." + "\n\n--- page 3 ---\n\n" + "Third page."
    )
    assert PAGE_SEPARATOR.format(n=2) == "\n\n--- page 2 ---\n\n"
    assert doc.warnings == []


def test_pdf_by_magic_bytes_whatever_the_suffix(tmp_path: Path) -> None:
    doc = read_document(write(tmp_path, "download.bin", make_text_pdf(["Misnamed."])))
    assert (doc.text, doc.pages) == ("Misnamed.", 1)


def test_pdf_with_a_blank_page_warns(tmp_path: Path) -> None:
    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(make_text_pdf(["Only text here."]))))
    writer.add_blank_page(612, 792)
    buf = io.BytesIO()
    writer.write(buf)
    doc = read_document(write(tmp_path, "mixed.pdf", buf.getvalue()))
    assert doc.text == "Only text here." + PAGE_SEPARATOR.format(n=2)
    assert doc.pages == 2
    assert any("page(s) 2 have no text layer" in w for w in doc.warnings)


def test_pdf_encrypted_with_empty_user_password_opens(tmp_path: Path) -> None:
    doc = read_document(write(tmp_path, "owner_only.pdf", make_encrypted_pdf("")))
    assert doc.text == "Locked text."


def test_pdf_refusals(tmp_path: Path) -> None:
    assert "password" in read_refused(write(tmp_path, "locked.pdf", make_encrypted_pdf("hunter2")))
    assert "no text layer" in read_refused(write(tmp_path, "scan.pdf", make_blank_pdf(3)))
    assert "OCR" in read_refused(write(tmp_path, "scan1.pdf", make_blank_pdf(1)))
    good = make_text_pdf(["Some text that will be cut off."])
    for name, data in [
        ("header_only.pdf", b"%PDF-1.4\n"),
        ("garbage.pdf", b"%PDF-1.7\n1 0 obj << /Type /Catalog >>\ngarbage garbage\n"),
        ("truncated.pdf", good[: len(good) // 3]),
        ("text_named_pdf.pdf", b"this is just text with a .pdf name"),
        ("empty.pdf", b""),
    ]:
        message = read_refused(write(tmp_path, name, data))
        assert name in message


def test_pdf_problems_never_reach_stderr(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    # pypdf logs "EOF marker not found" etc.; the CLI promises one error line, so those must be captured.
    good = make_text_pdf(["x"])
    for data in (b"%PDF-1.4\nnothing", good[:-7], good.replace(b"xref", b"xref ")):
        try:
            read_document(write(tmp_path, "p.pdf", data))
        except InputError:
            pass
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""


def test_files_are_never_modified(tmp_path: Path) -> None:
    fixtures = {
        "ok.txt": b"fine",
        "latin1.txt": "caf\xe9 au lait, ok".encode("latin-1"),
        "bin.txt": b"\x00\x01",
        "ok.pdf": make_text_pdf(["pdf"]),
        "locked.pdf": make_encrypted_pdf("pw"),
        "scan.pdf": make_blank_pdf(),
        "bad.pdf": b"%PDF-1.4 broken",
    }
    for name, data in fixtures.items():
        path = tmp_path / name
        path.write_bytes(data)
        os.utime(path, ns=(1_000_000_000, 1_000_000_000))
        before = path.stat()
        try:
            read_document(str(path))
        except InputError:
            pass
        after = path.stat()
        assert path.read_bytes() == data
        assert (after.st_mtime_ns, after.st_size, after.st_mode) == (
            before.st_mtime_ns,
            before.st_size,
            before.st_mode,
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(fixtures)


# -- fuzz ----------------------------------------------------------------------------------------------------
def _outcome(path: str) -> None:
    """Reading any bytes gives a Document with non-blank text, or an InputError; never anything else."""
    try:
        doc = read_document(path)
    except InputError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    assert isinstance(doc, Document)
    assert doc.text.strip()
    assert all(isinstance(w, str) and "\n" not in w for w in doc.warnings)


_VALID_PDF = make_text_pdf(["Fuzz page one.", "Fuzz page two."])


@st.composite
def mutated_pdf(draw: st.DrawFn) -> bytes:
    """A valid PDF with a few bytes overwritten and maybe truncated: reaches deeper into pypdf than noise."""
    data = bytearray(_VALID_PDF)
    for _ in range(draw(st.integers(0, 8))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    cut = draw(st.integers(0, len(data)))
    return bytes(data[: cut or len(data)])


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    data=st.one_of(
        st.binary(max_size=2048),
        st.binary(max_size=512).map(lambda b: b"%PDF-1.4\n" + b),
        st.text(max_size=300).map(lambda t: t.encode("utf-8", "surrogatepass")),
        mutated_pdf(),
    ),
    suffix=st.sampled_from([".txt", ".pdf", ".md"]),
)
def test_fuzz_any_bytes_give_document_or_input_error(tmp_path: Path, data: bytes, suffix: str) -> None:
    path = tmp_path / f"fuzz{suffix}"
    path.write_bytes(data)
    _outcome(str(path))
    assert path.read_bytes() == data


@settings(max_examples=50, deadline=None, database=None)
@given(data=st.binary(max_size=1024))
def test_fuzz_stdin(data: bytes) -> None:
    try:
        doc = read_document("-", stdin=io.BytesIO(data))
    except InputError:
        return
    assert doc.text.strip()
