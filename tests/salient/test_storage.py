import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from salient import storage


@pytest.mark.parametrize(
    "rel",
    ["../etc/passwd", "a/../../b", "/etc/passwd", "s3://bucket/key", "file:///etc/passwd", "a//b", "./a",
     "a\\..\\b", "", "~/x", "C:/windows", "a/\x00b", "a/.."],
)
def test_paths_that_escape_are_rejected(rel):
    with pytest.raises(storage.UnsafePathError):
        storage.under("s3://bucket/root", rel)


@pytest.mark.parametrize("rel", ["n01440764/n01440764_10026.JPEG", "a b/ü.jpg", "x..y/z"])
def test_plain_relative_paths_are_joined(rel):
    assert storage.under("s3://bucket/root/", rel) == f"s3://bucket/root/{rel}"


def test_atomic_write_replaces_and_leaves_no_temporaries(tmp_path):
    target = tmp_path / "sub" / "table.json"
    storage.write_json(str(target), {"a": 1})
    storage.write_json(str(target), {"a": 2})
    assert json.loads(target.read_text()) == {"a": 2}
    assert os.listdir(tmp_path / "sub") == ["table.json"]


def test_failed_local_write_leaves_previous_object(tmp_path, monkeypatch):
    target = tmp_path / "x.parquet"
    storage.write_bytes_atomic(str(target), b"old")

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        storage.write_bytes_atomic(str(target), b"new")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["x.parquet"]


@pytest.mark.parametrize("root", ["memory://salient-test-storage", "LOCAL"])
def test_parquet_carries_schema_version_and_fingerprint(tmp_path, root):
    root = str(tmp_path) if root == "LOCAL" else root
    uri = storage.join(root, "t", "table.parquet")
    table = pa.table({"x": [1, 2, 3]})
    storage.write_parquet(uri, table, fingerprint="abc123", metadata={"stage": "test"})
    assert storage.read_parquet(uri).column("x").to_pylist() == [1, 2, 3]
    meta = storage.parquet_metadata(uri)
    assert meta["schema_version"] == storage.SCHEMA_VERSION
    assert meta["fingerprint"] == "abc123" and meta["stage"] == "test"
    if root == str(tmp_path):
        assert pq.ParquetFile(uri).metadata.row_group(0).column(0).compression == "ZSTD"


def test_fingerprint_is_stable_and_order_free():
    assert storage.fingerprint({"a": 1, "b": 2}) == storage.fingerprint({"b": 2, "a": 1})
    assert storage.fingerprint({"a": 1}) != storage.fingerprint({"a": 2})


def test_check_writable(tmp_path):
    storage.check_writable(str(tmp_path / "new" / "out"))
    assert os.listdir(tmp_path / "new" / "out") == []
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OSError):
        storage.check_writable(str(blocker / "out"))


def test_a_local_listing_gives_what_fsspec_gives(tmp_path):
    """The local fast path of ``ls_detail`` and ``url_to_fs`` against fsspec itself: files, folders,
    links that resolve and links that do not, a named pipe."""
    import fsspec

    (tmp_path / "a.JPEG").write_bytes(b"x" * 17)
    (tmp_path / "folder").mkdir()
    os.symlink("a.JPEG", tmp_path / "link.JPEG")
    os.symlink("nowhere", tmp_path / "broken.JPEG")
    os.mkfifo(tmp_path / "pipe.JPEG")
    fs = fsspec.filesystem("file")

    def fields(entries):
        return sorted((e["name"], e["type"], e["size"], e["mtime"]) for e in entries)

    assert fields(storage.ls_detail(fs, str(tmp_path))) == fields(fs.ls(str(tmp_path), detail=True))
    assert {e["type"] for e in storage.ls_detail(fs, str(tmp_path))} == {"file", "directory", "other"}
    for uri in (str(tmp_path), f"{tmp_path}/folder/", "relative/path", "~/x", "."):
        fs_ours, path = storage.url_to_fs(uri)
        fs_theirs, expected = fsspec.core.url_to_fs(uri)
        assert (type(fs_ours), path) == (type(fs_theirs), expected)
    assert storage.url_to_fs(tmp_path)[1] == fsspec.core.url_to_fs(tmp_path)[1] == str(tmp_path), "a path object too"


def test_a_local_copy_is_a_link_that_replaces_what_was_there(tmp_path):
    src, dst = tmp_path / "src.bin", tmp_path / "deep" / "er" / "dst.bin"
    src.write_bytes(b"new")
    storage.copy_file(str(src), str(dst))
    assert dst.read_bytes() == b"new" and os.stat(dst).st_ino == os.stat(src).st_ino
    other = tmp_path / "other.bin"
    other.write_bytes(b"newer")
    storage.copy_file(str(other), str(dst))
    assert dst.read_bytes() == b"newer" and sorted(os.listdir(dst.parent)) == ["dst.bin"], "no temporary left"
    with pytest.raises(FileNotFoundError):
        storage.copy_file(str(tmp_path / "missing.bin"), str(tmp_path / "x.bin"))
