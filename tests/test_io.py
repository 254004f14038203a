"""genfast._io: the readers of untrusted files (safetensors weights, JSON configs) and the one atomic writer."""

import json
import os
import re
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from genfast import _io


def test_header_gives_shapes_and_dtypes_without_loading(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(3, 5), "b": torch.zeros(7, dtype=torch.bfloat16), "c": torch.zeros(0, 2)}, str(path))
    header = _io.read_safetensors_header(path)
    assert header == {"a": ("F32", (3, 5)), "b": ("BF16", (7,)), "c": ("F32", (0, 2))}
    assert header["a"].numel == 15
    state = _io.load_safetensors_state(path)
    assert {k: tuple(v.shape) for k, v in state.items()} == {k: v.shape for k, v in header.items()}


def _raw(path, header: dict, data: bytes = b""):
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


@pytest.mark.parametrize("header, data", [
    ({"w": {"dtype": "F32", "shape": [10**12, 10**12], "data_offsets": [0, 16]}}, bytes(16)),  # claims huge
    ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 32]}}, bytes(16)),  # past the end
    ({"w": {"dtype": "F99", "shape": [4], "data_offsets": [0, 16]}}, bytes(16)),  # unknown dtype
    ({"w": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}, bytes(16)),
    ({"w": {"dtype": "F32", "shape": ["4"], "data_offsets": [0, 16]}}, bytes(16)),
    ({"w": [1, 2]}, b""),
])
def test_header_refuses_inconsistent_entries(tmp_path, header, data):
    path = _raw(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(ValueError, match="bad.safetensors"):
        _io.read_safetensors_header(path)


def test_header_refuses_a_lying_length_and_garbage(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", 2**60) + b"{}")
    with pytest.raises(ValueError, match="x.safetensors"):
        _io.read_safetensors_header(path)
    path.write_bytes(b"abc")
    with pytest.raises(ValueError, match="x.safetensors"):
        _io.read_safetensors_header(path)
    path.write_bytes(struct.pack("<Q", 4) + b"\xff\xfe{]")
    with pytest.raises(ValueError, match="x.safetensors"):
        _io.read_safetensors_header(path)
    with pytest.raises(ValueError, match="x.safetensors"):
        _io.load_safetensors_state(path)
    with pytest.raises(FileNotFoundError, match="missing"):
        _io.read_safetensors_header(tmp_path / "missing.safetensors")


def test_json_config_reads_an_object(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"n_layer": 2, "nested": {"a": [1, 2]}}))
    assert _io.read_json_config(path) == {"n_layer": 2, "nested": {"a": [1, 2]}}


@pytest.mark.parametrize("text, match", [
    ("[" * 100_000 + "]" * 100_000, "nested"),  # RecursionError in json today
    ('{"a": ' + "[" * 40 + "]" * 40 + "}", "nested"),
    ("[1, 2]", "JSON object"),
    ("{not json", "not valid JSON"),
    ("", "not valid JSON"),
])
def test_json_config_clear_errors(tmp_path, text, match):
    path = tmp_path / "config.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=match) as info:
        _io.read_json_config(path)
    assert "config.json" in str(info.value)


def test_json_config_missing_and_binary(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        _io.read_json_config(tmp_path / "config.json")
    (tmp_path / "config.json").write_bytes(b"\xff\x00\x81")
    with pytest.raises(ValueError, match="config.json"):
        _io.read_json_config(tmp_path / "config.json")


# ------------------------------------------------------------------------------------------ the atomic writer
def test_write_atomic_replaces_the_file_with_the_users_umask(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"old")
    old = os.umask(0o022)
    try:
        assert _io.write_atomic(path, b"new bytes") == path
    finally:
        os.umask(old)
    assert path.read_bytes() == b"new bytes"
    assert path.stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600: any file the user writes gets 0644 here
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]  # no temporary file left


def test_write_atomic_leaves_the_old_file_when_it_fails(tmp_path, monkeypatch):
    """An interrupted write (here: the rename fails) leaves the old file whole and removes the temporary one."""
    path = tmp_path / "config.json"
    path.write_bytes(b"old")
    renamed = []

    def failing_replace(src, dst):
        renamed.append(Path(src))
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk gone"):
        _io.write_atomic(path, b"new")
    assert path.read_bytes() == b"old"
    assert renamed[0].parent == tmp_path and renamed[0].name.startswith(".config.json.")  # beside the file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]
    with pytest.raises(TypeError):  # str, not bytes: refused before anything replaces the file
        _io.write_atomic(path, "text")
    assert path.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


def test_format_version_and_atomic_writer_are_written_once():
    """Issue 28: one FORMAT_VERSION (genfast.models._checkpoint; training imports it) and one atomic file writer
    (genfast._io.write_atomic): no other module defines the version or writes a temporary file and renames it."""
    root = Path(__file__).resolve().parent.parent / "genfast"
    sources = {path.relative_to(root).as_posix(): path.read_text() for path in root.rglob("*.py")}
    versions = [name for name, text in sources.items() if re.search(r"^\s*\w*FORMAT_VERSION\s*[:=]", text, re.M)]
    assert versions == ["models/_checkpoint.py"]
    writer = re.compile(r'mkstemp|NamedTemporaryFile|os\.fdopen\(fd, "wb"\)')  # what the three old writers used
    writers = [name for name, text in sources.items() if writer.search(text)]
    assert writers == ["_io.py"]
