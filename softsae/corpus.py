"""An offline English text corpus from what ships with Python, split by document.

    docs = python_docs_corpus()                    # list[Document], in a fixed (hash-shuffled) order
    train, held = split_documents(docs, 0.1)       # held-out by document, deterministic

Sources (nothing is downloaded, nothing from the standard library is imported):

* ``topics``: the documentation topics of ``pydoc_data.topics`` (the reference-manual sections
  ``help()`` shows), one document per topic;
* ``docstrings``: module, class and function docstrings of every ``.py`` file of the standard
  library directory (``sysconfig`` ``stdlib``, its test suite included), read with ``ast`` (no
  import); ``site-packages`` is skipped; one document per docstring;
* ``comments``: the ``#`` comments of the stdlib's ``.py`` files outside the test suite (read with
  ``tokenize``), one document per file, one paragraph per block of consecutive comment lines;
* ``files``: documentation files shipped with this Python: the stdlib's ``*.txt`` files (IDLE's
  help and news, ...), IDLE's ``help.html`` (tags stripped) and the ``python3.x.1`` man page.

Every document has a stable id (``topics/<key>``, ``docstrings/<relpath>:<qualname>``,
``comments/<relpath>``, ``files/<relpath>``). The held-out split assigns a document by a hash of
its id alone, so it does not depend on the order, on which other documents exist, or on the
process (no ``hash()``).
The corpus order is the documents sorted by a second hash of the id: any prefix of it (when
extraction stops at a token budget) is a random sample of all sources, the same on every run.
"""

from __future__ import annotations

import ast
import hashlib
import html
import io
import re
import sysconfig
import tokenize
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

SOURCES = ("topics", "docstrings", "comments", "files")
_TEST_DIRS = {"test", "tests", "idle_test"}
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}
_MIN_CHARS = 20  # paragraphs shorter than this are dropped (headings, "Returns None.")


@dataclass(frozen=True)
class Document:
    """One document: a stable id, its source (one of SOURCES) and its text."""

    id: str
    source: str
    text: str

    def paragraphs(self, min_chars: int = _MIN_CHARS) -> list[str]:
        """Blank-line separated paragraphs with at least ``min_chars`` characters (stripped)."""
        return [p.strip() for p in re.split(r"\n\s*\n", self.text) if len(p.strip()) >= min_chars]


def _hash01(s: str, salt: str) -> float:
    """A uniform number in [0, 1) from sha256(salt + s): stable across runs and platforms."""
    h = hashlib.sha256((salt + "\0" + s).encode("utf-8")).digest()
    return int.from_bytes(h[:8], "big") / 2.0**64


def is_heldout(doc_id: str, heldout_frac: float) -> bool:
    """Whether document ``doc_id`` belongs to the held-out split (depends on the id only)."""
    if not 0.0 <= heldout_frac < 1.0:
        raise ValueError(f"heldout_frac must lie in [0, 1), got {heldout_frac}")
    return _hash01(doc_id, "heldout") < heldout_frac


def split_documents(docs: Iterable[Document], heldout_frac: float) -> tuple[list[Document], list[Document]]:
    """(train, held-out) lists, keeping the input order within each."""
    train, held = [], []
    for d in docs:
        (held if is_heldout(d.id, heldout_frac) else train).append(d)
    return train, held


def stdlib_dir() -> Path:
    """The standard library directory of the running Python."""
    return Path(sysconfig.get_paths()["stdlib"])


def topic_documents() -> Iterator[Document]:
    """One document per ``pydoc_data.topics`` entry."""
    from pydoc_data.topics import topics

    for key in sorted(topics):
        yield Document(f"topics/{key}", "topics", topics[key])


def _py_files(root: Path, tests: bool) -> Iterator[Path]:
    """The stdlib's .py files (sorted), without site-packages; without the test suite unless ``tests``."""
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root).parts
        if any(part in _SKIP_DIRS for part in rel[:-1]):
            continue
        if not tests and (any(part in _TEST_DIRS for part in rel[:-1]) or rel[-1].startswith("test_")):
            continue
        yield p


def _docstrings(tree: ast.Module) -> Iterator[tuple[str, str]]:
    """(qualname, docstring) of the module ("" qualname), its classes and functions, nested."""
    doc = ast.get_docstring(tree, clean=True)
    if doc:
        yield "", doc
    stack: list[tuple[str, ast.AST]] = [("", tree)]
    while stack:
        prefix, node = stack.pop(0)
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}.{child.name}" if prefix else child.name
                d = ast.get_docstring(child, clean=True)
                if d:
                    yield name, d
                stack.append((name, child))


def docstring_documents(root: Path | None = None) -> Iterator[Document]:
    """One document per module/class/function docstring of the stdlib's ``.py`` files (via ``ast``).

    Files that do not parse with this Python (e.g. lib2to3 fixtures) are skipped. Ids repeat only
    if a file defines the same qualified name twice (e.g. platform-dependent defs); the second gets
    a ``#2`` suffix.
    """
    root = stdlib_dir() if root is None else Path(root)
    for path in _py_files(root, tests=True):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
        except (SyntaxError, ValueError):
            continue
        rel = path.relative_to(root).as_posix()
        seen: dict[str, int] = {}
        for qual, doc in _docstrings(tree):
            seen[qual] = seen.get(qual, 0) + 1
            suffix = f"#{seen[qual]}" if seen[qual] > 1 else ""
            yield Document(f"docstrings/{rel}:{qual}{suffix}", "docstrings", doc)


def _comment_blocks(src: str) -> list[str]:
    """Blocks of consecutive full-line comments of Python source ``src`` (an inline comment is a block
    of its own), '#' and the shebang/coding lines removed."""
    blocks: list[list[str]] = []
    last_row = -2
    for t in tokenize.generate_tokens(io.StringIO(src).readline):
        if t.type != tokenize.COMMENT:
            continue
        body = t.string.lstrip("#").strip()
        if t.start[0] <= 2 and (body.startswith("!") or "coding" in body):
            continue
        full_line = t.line.lstrip().startswith("#")  # an inline comment after code is a block of its own
        if not full_line or t.start[0] != last_row + 1 or not blocks:
            blocks.append([])
        blocks[-1].append(body)
        last_row = t.start[0] if full_line else -2
    return [" ".join(w for w in b if w) for b in blocks]


def comment_documents(root: Path | None = None) -> Iterator[Document]:
    """One document per stdlib ``.py`` file outside the test suite: its comment blocks as paragraphs."""
    root = stdlib_dir() if root is None else Path(root)
    for path in _py_files(root, tests=False):
        try:
            blocks = _comment_blocks(path.read_text(encoding="utf-8", errors="replace"))
        except (tokenize.TokenError, SyntaxError, ValueError):
            continue
        if blocks:
            yield Document(f"comments/{path.relative_to(root).as_posix()}", "comments", "\n\n".join(blocks))


_TAG = re.compile(r"<[^>]+>")
_MAN = re.compile(r"^\.[A-Za-z]+\s?|\\f[BIRP]|\\-|\\&|\\\(..")


def _html_text(s: str) -> str:
    s = re.sub(r"(?is)<(script|style)\b.*?</\1>", " ", s)
    s = re.sub(r"(?i)<\s*(p|div|h[1-6]|li|dt|dd|pre|br)\b[^>]*>", "\n\n", s)
    return html.unescape(_TAG.sub("", s))


def _man_text(s: str) -> str:
    lines = []
    for line in s.splitlines():
        if line.startswith(('.\\"', "'\\\"")):
            continue
        if line.startswith((".PP", ".SH", ".SS", ".TP", ".IP", ".LP")):
            lines.append("")
        lines.append(_MAN.sub("", line))
    return "\n".join(lines)


def file_documents(root: Path | None = None) -> Iterator[Document]:
    """Documentation files shipped with Python: stdlib ``*.txt``, IDLE's help.html, the man page."""
    root = stdlib_dir() if root is None else Path(root)
    for p in sorted(root.rglob("*.txt")):
        rel = p.relative_to(root)
        if any(part in _SKIP_DIRS | _TEST_DIRS for part in rel.parts[:-1]) or p.stat().st_size > 2_000_000:
            continue
        yield Document(f"files/{rel.as_posix()}", "files", p.read_text(encoding="utf-8", errors="replace"))
    help_html = root / "idlelib" / "help.html"
    if help_html.is_file():
        yield Document("files/idlelib/help.html", "files",
                       _html_text(help_html.read_text(encoding="utf-8", errors="replace")))
    man_dir = root.parent.parent / "share" / "man" / "man1"
    for p in sorted(man_dir.glob("python*.1")) if man_dir.is_dir() else []:
        if p.is_file() and not p.is_symlink():
            yield Document(f"files/man1/{p.name}", "files", _man_text(p.read_text(encoding="utf-8", errors="replace")))


def python_docs_corpus(sources: Iterable[str] = SOURCES, root: Path | None = None) -> list[Document]:
    """All documents of ``sources``, in the corpus order (sorted by a hash of the id)."""
    sources = list(sources)
    bad = [s for s in sources if s not in SOURCES]
    if bad or not sources:
        raise ValueError(f"sources must be a non-empty subset of {SOURCES}, got {sources}")
    docs: list[Document] = []
    if "topics" in sources:
        docs.extend(topic_documents())
    if "docstrings" in sources:
        docs.extend(docstring_documents(root))
    if "comments" in sources:
        docs.extend(comment_documents(root))
    if "files" in sources:
        docs.extend(file_documents(root))
    docs = [d for d in docs if d.paragraphs()]
    ids = [d.id for d in docs]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise RuntimeError(f"duplicate document ids in the corpus: {dup}")
    return sorted(docs, key=lambda d: (_hash01(d.id, "order"), d.id))
