"""The offline Python-docs corpus: sources, stable ids, deterministic held-out split by document."""

from __future__ import annotations

import pytest

from softsae.corpus import (
    SOURCES,
    Document,
    comment_documents,
    docstring_documents,
    file_documents,
    is_heldout,
    python_docs_corpus,
    split_documents,
    topic_documents,
)

MOD = '''"""Module doc: a tiny module used to test the corpus reader."""

# First comment block, line one
# and line two of the same block.
x = 1  # trailing comment


class Widget:
    """Widget doc: a class with a documented method."""

    def spin(self):
        """Spin doc: turns the widget around once."""
        # comment inside a method body
        return 1


def helper():
    return 2
'''


@pytest.fixture
def fake_stdlib(tmp_path):
    root = tmp_path / "lib"
    (root / "pkg").mkdir(parents=True)
    (root / "test").mkdir()
    (root / "site-packages" / "other").mkdir(parents=True)
    (root / "pkg" / "mod.py").write_text(MOD)
    (root / "broken.py").write_text("def (:\n    '''never parsed'''\n")
    (root / "test" / "test_mod.py").write_text('"""Test module doc: tests are docstrings too."""\n# test comment\n')
    (root / "site-packages" / "other" / "x.py").write_text('"""Third-party doc, not part of the stdlib."""\n')
    (root / "README.txt").write_text("A readme shipped with Python.\n\nSecond paragraph of the readme file.")
    (root / "test" / "data.txt").write_text("test data file that is not documentation at all")
    return root


def test_docstrings_comments_and_files_from_source(fake_stdlib):
    docs = {d.id: d for d in docstring_documents(fake_stdlib)}
    assert set(docs) == {"docstrings/pkg/mod.py:", "docstrings/pkg/mod.py:Widget", "docstrings/pkg/mod.py:Widget.spin",
                         "docstrings/test/test_mod.py:"}  # broken.py skipped, site-packages skipped
    assert docs["docstrings/pkg/mod.py:Widget.spin"].text == "Spin doc: turns the widget around once."
    comments = list(comment_documents(fake_stdlib))
    assert [d.id for d in comments] == ["comments/pkg/mod.py"]  # no comments from the test suite
    paras = comments[0].paragraphs(min_chars=1)
    assert paras[0] == "First comment block, line one and line two of the same block."
    assert "trailing comment" in paras and "comment inside a method body" in paras
    files = list(file_documents(fake_stdlib))
    assert [d.id for d in files] == ["files/README.txt"]
    assert files[0].paragraphs() == ["A readme shipped with Python.", "Second paragraph of the readme file."]


def test_corpus_order_is_a_stable_shuffle_and_ids_are_unique(fake_stdlib):
    a = python_docs_corpus(("docstrings", "comments", "files"), root=fake_stdlib)
    b = python_docs_corpus(("files", "comments", "docstrings"), root=fake_stdlib)
    assert [d.id for d in a] == [d.id for d in b]
    assert len({d.id for d in a}) == len(a) == 6
    with pytest.raises(ValueError, match="sources"):
        python_docs_corpus(("nope",))


def test_topics_are_the_pydoc_reference():
    topics = list(topic_documents())
    assert len(topics) > 50 and all(d.id.startswith("topics/") and d.paragraphs() for d in topics)
    assert SOURCES == ("topics", "docstrings", "comments", "files")


def test_heldout_split_depends_on_the_id_only():
    docs = [Document(f"doc/{i}", "text", f"text number {i} long enough") for i in range(4000)]
    train, held = split_documents(docs, 0.1)
    assert len(train) + len(held) == 4000
    assert 0.08 < len(held) / 4000 < 0.12
    held_rev = split_documents(docs[::-1], 0.1)[1]
    assert {d.id for d in held_rev} == {d.id for d in held}
    assert all(is_heldout(d.id, 0.1) for d in held) and not any(is_heldout(d.id, 0.1) for d in train)
    assert split_documents(docs, 0.0)[1] == []
    # a larger fraction keeps every document held out at a smaller one (the hash is a threshold)
    assert {d.id for d in held} <= {d.id for d in split_documents(docs, 0.3)[1]}
    with pytest.raises(ValueError, match="heldout_frac"):
        is_heldout("x", 1.0)
