"""genfast.data.text: the default training text (Python's standard library source) and users' text files."""

import pytest

from genfast.data.text import read_text_file, stdlib_directory, stdlib_source_files, stdlib_text


def _tree(root):
    (root / "pkg").mkdir(parents=True)
    (root / "site-packages").mkdir()
    (root / "b.py").write_text("b = 2")
    (root / "a.py").write_text("a = 1\n")
    (root / "notes.txt").write_text("not python")
    (root / "pkg" / "c.py").write_text("c = 3\n")
    (root / "site-packages" / "third_party.py").write_text("x = 0\n")
    (root / "pkg" / "latin.py").write_bytes("s = 'café'\n".encode("latin-1"))
    (root / "pkg" / "blank.py").write_text("\n\n")


def test_stdlib_text_order_skips_and_cap(tmp_path):
    _tree(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in stdlib_source_files(tmp_path)] == [
        "a.py", "b.py", "pkg/blank.py", "pkg/c.py", "pkg/latin.py"]
    # not UTF-8 and blank files skipped, third-party packages excluded, a newline added where missing
    assert stdlib_text(directory=tmp_path) == "a = 1\n\nb = 2\n\nc = 3\n"
    assert stdlib_text(9, directory=tmp_path) == "a = 1\n\nb "
    with pytest.raises(ValueError, match="max_chars must be an int >= 1"):
        stdlib_text(0, directory=tmp_path)
    with pytest.raises(FileNotFoundError, match="no readable .py files"):
        stdlib_text(directory=tmp_path / "pkg" / "nothing")


def test_the_real_standard_library():
    assert (stdlib_directory() / "os.py").is_file()
    text = stdlib_text(50_000)
    assert len(text) == 50_000 and text == stdlib_text(50_000)  # capped and deterministic
    assert "def " in text and "import " in text


def test_read_text_file(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("héllo\n", encoding="utf-8")
    assert read_text_file(path) == "héllo\n" and read_text_file(path, max_chars=2) == "hé"
    with pytest.raises(FileNotFoundError, match="data: no file at"):
        read_text_file(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="is not a file"):
        read_text_file(tmp_path)
    path.write_bytes(b"\xff\xfe bad")
    with pytest.raises(ValueError, match="is not UTF-8 text"):
        read_text_file(path)
    path.write_text(" \n\t")
    with pytest.raises(ValueError, match="is empty"):
        read_text_file(path)
