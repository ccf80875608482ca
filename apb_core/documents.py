"""Read the document a question is about: a text file, a PDF, or stdin, into one string of text.

Every way a document can be unusable ends in one `InputError` whose message is a single line naming the
file and what to do, so the CLI can print it and exit 2 before any model work starts. The user's file is
only ever opened for reading.

Rules (the README repeats them):

- `.pdf` files, and any input whose bytes start with `%PDF-`, are read with pypdf. Pages are joined in page
  order; before page N (N >= 2) the text gets the line `--- page N ---` surrounded by blank lines (see
  `PAGE_SEPARATOR`), so the model, and a person reading a quote, can tell where a page starts. Encrypted PDFs
  are opened with the empty password (most "protected" PDFs only restrict printing/copying); if that fails
  they are refused. A PDF without any extractable text (scanned images) is refused with a hint to OCR it.
- Everything else is read as UTF-8 text (a UTF-8 byte-order mark is dropped; UTF-16 with a byte-order mark is
  decoded too; `\\r\\n` becomes `\\n`). The invalid-UTF-8 rule: a file is refused as binary if it contains a
  NUL byte, or if more than `MAX_CONTROL_FRACTION` (1%) of its characters are control characters other than
  tab/newline/carriage return/form feed/vertical tab/escape. It is refused as "not UTF-8" if more than
  `MAX_INVALID_FRACTION` (10%) of its bytes are not valid UTF-8. Otherwise each invalid byte is replaced by
  U+FFFD and `Document.warnings` says how many there were and where the first one is: a Latin-1 file with a
  few accented letters still works, while an image or archive renamed to `.txt` does not.
- Empty and whitespace-only documents are refused.
"""

from __future__ import annotations

import io
import logging
import re
import stat
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from apb_core.errors import InputError

# Before page n (n >= 2). A visible line rather than a bare form feed: tokenizers often drop or merge "\f",
# and a model asked "on which page ..." can only answer if the page boundary is in the text it reads.
PAGE_SEPARATOR = "\n\n--- page {n} ---\n\n"

MAX_BYTES = 1 << 30  # 1 GiB: far beyond any context window; stops `/dev/zero`-like inputs from eating memory
MAX_INVALID_FRACTION = 0.10  # Latin-1 prose has a few % non-ASCII bytes; binary data has ~50% invalid UTF-8
MAX_CONTROL_FRACTION = 0.01  # real text almost never holds C0 control characters; binary data is full of them

# C0 controls and DEL, except those that do occur in text files: \t \n \v \f \r and ESC (ANSI-coloured logs).
_CONTROL_RE = re.compile("[\x00-\x08\x0e-\x1a\x1c-\x1f\x7f]")
_INVALID_BYTE_RE = re.compile("[\udc80-\udcff]")  # what surrogateescape turns each invalid byte into


@dataclass
class Document:
    """A document's text, ready to be tokenized, and what reading it found worth telling the user."""

    text: str
    source: str  # the path as given, or "<stdin>"
    pages: int | None = None  # page count for PDFs, None for text
    warnings: list[str] = field(default_factory=list)


def read_document(path: str, stdin: BinaryIO | None = None) -> Document:
    """Read `path` (or stdin's bytes when `path` is "-") into a `Document`.

    `stdin` replaces `sys.stdin.buffer` (tests pass a BytesIO). Raises `InputError` with a one-line message
    for a missing path, a directory, an unreadable, empty, whitespace-only, binary or non-UTF-8 file, and for
    a corrupt, password-protected or text-less PDF. Never writes to the file.
    """
    if path == "-":
        source = "<stdin>"
        data = _read_stdin(stdin)
    else:
        source = path
        data = _read_file(path)
    if not data:
        raise InputError(f"{source}: the document is empty")
    if path.lower().endswith(".pdf") or data.startswith(b"%PDF-"):
        return _read_pdf(data, source)
    return _read_text(data, source)


def _read_stdin(stdin: BinaryIO | None) -> bytes:
    if stdin is None:
        if sys.stdin is None:
            raise InputError("<stdin>: no standard input to read the document from")
        if sys.stdin.isatty():
            # Reading would wait for the user to type a document; nobody means that.
            raise InputError("<stdin>: standard input is a terminal; pipe a document into apb instead")
        stdin = sys.stdin.buffer
    try:
        data = stdin.read(MAX_BYTES + 1)
    except OSError as exc:
        raise InputError(f"<stdin>: cannot read standard input: {exc.strerror or exc}") from exc
    if len(data) > MAX_BYTES:
        raise InputError(f"<stdin>: the document is larger than {MAX_BYTES >> 20} MiB")
    return data


def _read_file(path: str) -> bytes:
    if not path:
        raise InputError("no document path given")
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except NotADirectoryError:
        raise InputError(f"{path}: no such file (a parent is not a directory)") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot access: {exc.strerror or exc}") from None
    if stat.S_ISDIR(st.st_mode):
        raise InputError(f"{path}: is a directory, not a document")
    if stat.S_ISREG(st.st_mode) and st.st_size > MAX_BYTES:
        raise InputError(f"{path}: the document is larger than {MAX_BYTES >> 20} MiB")
    try:
        with open(p, "rb") as f:
            data = f.read(MAX_BYTES + 1)
    except PermissionError:
        raise InputError(f"{path}: permission denied") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if len(data) > MAX_BYTES:
        raise InputError(f"{path}: the document is larger than {MAX_BYTES >> 20} MiB")
    return data


def _read_text(data: bytes, source: str) -> Document:
    """Decode text bytes under the module's invalid-UTF-8 rule."""
    notes: list[str] = []
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            text = data.decode("utf-16")
        except UnicodeDecodeError:
            raise InputError(f"{source}: has a UTF-16 byte-order mark but is not valid UTF-16") from None
        # Checked after decoding: UTF-16 is full of NUL bytes by design.
        _refuse_if_controls(text, source)
        notes.append(f"{source}: decoded as UTF-16 (byte-order mark found)")
    else:
        if b"\x00" in data:
            raise InputError(f"{source}: looks like a binary file (contains NUL bytes), not text")
        if data.startswith(b"\xef\xbb\xbf"):
            data = data[3:]
        # surrogateescape maps each invalid byte to one lone surrogate, so they can be counted exactly.
        text = data.decode("utf-8", errors="surrogateescape")
        invalid = len(_INVALID_BYTE_RE.findall(text))
        if invalid > MAX_INVALID_FRACTION * len(data):
            raise InputError(
                f"{source}: not UTF-8 text ({invalid / len(data):.0%} of bytes are invalid UTF-8); "
                "if it is text, convert it first (e.g. `iconv -f latin1 -t utf-8`)"
            )
        _refuse_if_controls(text, source)
        if invalid:
            first = _INVALID_BYTE_RE.search(text)
            assert first is not None
            first_byte = len(text[: first.start()].encode("utf-8", errors="surrogateescape"))
            text = _INVALID_BYTE_RE.sub("\ufffd", text)
            notes.append(
                f"{source}: {invalid} invalid UTF-8 byte(s) replaced by U+FFFD (first at byte offset {first_byte})"
            )
    text = text.replace("\r\n", "\n")
    if not text.strip():
        raise InputError(f"{source}: the document contains only whitespace")
    return Document(text=text, source=source, pages=None, warnings=notes)


def _refuse_if_controls(text: str, source: str) -> None:
    controls = len(_CONTROL_RE.findall(text))
    if "\x00" in text or controls > MAX_CONTROL_FRACTION * max(len(text), 1):
        raise InputError(f"{source}: looks like a binary file (control characters), not text")


class _CollectLogs(logging.Handler):
    """Keeps pypdf's log records: left alone they go to stderr through logging's last-resort handler."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.messages.append(record.getMessage())
        except Exception:  # a malformed record from a library must not break reading
            self.messages.append(str(record.msg))


def _read_pdf(data: bytes, source: str) -> Document:
    """Extract a PDF's text layer page by page (see the module docstring for the separator and refusals)."""
    logger = logging.getLogger("pypdf")
    handler = _CollectLogs()
    saved_propagate = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            page_texts, failed_pages = _extract_pdf_pages(data, source)
    finally:
        logger.removeHandler(handler)
        logger.propagate = saved_propagate

    pages = len(page_texts)
    if not any(t.strip() for t in page_texts):
        if failed_pages:
            raise InputError(f"{source}: could not extract text from any of the {pages} PDF page(s)")
        raise InputError(
            f"{source}: the PDF has no text layer ({pages} page(s), likely scanned images); "
            "run OCR on it first (e.g. `ocrmypdf in.pdf out.pdf`)"
        )
    notes: list[str] = []
    if failed_pages:
        notes.append(f"{source}: text extraction failed on page(s) {_page_list(failed_pages)}; left empty")
    empty = [i + 1 for i, t in enumerate(page_texts) if not t.strip() and i + 1 not in failed_pages]
    if empty:
        notes.append(f"{source}: page(s) {_page_list(empty)} have no text layer (images only?)")
    if handler.messages:
        notes.append(
            f"{source}: the PDF has {len(handler.messages)} structural problem(s) "
            f"(first: {handler.messages[0].strip()}); some text may be missing"
        )
    parts = [page_texts[0]]
    for n, page_text in enumerate(page_texts[1:], start=2):
        parts.append(PAGE_SEPARATOR.format(n=n))
        parts.append(page_text)
    text = "".join(parts).replace("\r\n", "\n")
    return Document(text=text, source=source, pages=pages, warnings=notes)


def _extract_pdf_pages(data: bytes, source: str) -> tuple[list[str], list[int]]:
    """Return each page's text (in order) and the 1-based numbers of pages whose extraction raised."""
    from pypdf import PdfReader
    from pypdf.errors import DependencyError, FileNotDecryptedError

    try:
        reader = PdfReader(io.BytesIO(data), strict=False)
        if reader.is_encrypted:
            try:
                decrypted = reader.decrypt("")
            except DependencyError:
                raise InputError(f"{source}: the PDF is AES-encrypted; install `cryptography` to open it") from None
            if not decrypted:
                raise InputError(f"{source}: the PDF is password-protected; decrypt it first (e.g. `qpdf --decrypt`)")
        page_count = len(reader.pages)
    except InputError:
        raise
    except FileNotDecryptedError:
        raise InputError(f"{source}: the PDF is password-protected; decrypt it first") from None
    except RecursionError:
        raise InputError(f"{source}: not a readable PDF (its structure is too deeply nested)") from None
    except Exception as exc:  # pypdf raises many types (PdfReadError, ValueError, KeyError, ...) on bad bytes
        raise InputError(f"{source}: not a readable PDF ({_short(exc)})") from None
    if page_count == 0:
        raise InputError(f"{source}: not a readable PDF (no pages found)")

    page_texts: list[str] = []
    failed: list[int] = []
    for i in range(page_count):
        try:
            page_texts.append(reader.pages[i].extract_text() or "")
        except Exception:  # one broken page should not lose the others (RecursionError included)
            page_texts.append("")
            failed.append(i + 1)
    return page_texts, failed


def _short(exc: BaseException) -> str:
    """One line describing `exc`, short enough to sit inside an error message."""
    msg = " ".join(str(exc).split()) or type(exc).__name__
    return msg if len(msg) <= 120 else msg[:117] + "..."


def _page_list(pages: list[int]) -> str:
    shown = ", ".join(str(p) for p in pages[:10])
    return shown + (f" and {len(pages) - 10} more" if len(pages) > 10 else "")
