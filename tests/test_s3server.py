"""The S3 fixture (tests/s3server.py) works with pyarrow: parquet through the filesystem and
through a URI, and objects that appear only when their stream is closed."""

from __future__ import annotations

import pickle

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pyarrow import fs as pafs

from s3server import Bucket


def test_parquet_write_list_read(s3: Bucket) -> None:
    table = pa.table({"x": list(range(100)), "y": [str(i) for i in range(100)]})
    pq.write_table(table, s3.path("data/part-0.parquet"), filesystem=s3.fs)

    infos = s3.fs.get_file_info(pafs.FileSelector(s3.path("data"), recursive=True))
    assert [(i.base_name, i.type) for i in infos] == [("part-0.parquet", pafs.FileType.File)]
    assert pq.read_table(s3.path("data/part-0.parquet"), filesystem=s3.fs).equals(table)

    fs, root = pafs.FileSystem.from_uri(s3.uri("data"))
    assert root == s3.path("data")
    assert pq.read_table(f"{root}/part-0.parquet", filesystem=fs).equals(table)

    copy = pickle.loads(pickle.dumps(s3.fs))
    assert copy.get_file_info(s3.path("data/part-0.parquet")).size == infos[0].size


def test_output_stream_object_appears_on_close(s3: Bucket) -> None:
    path = s3.path("obj.bin")
    out = s3.fs.open_output_stream(path)
    out.write(b"x" * (6 << 20))  # over the 5 MiB minimum part: a part may be sent already
    assert s3.fs.get_file_info(path).type == pafs.FileType.NotFound
    out.close()
    assert s3.fs.get_file_info(path).size == 6 << 20
    with s3.fs.open_input_stream(path) as f:
        assert f.read(4) == b"xxxx"
    s3.fs.delete_file(path)
    assert s3.fs.get_file_info(path).type == pafs.FileType.NotFound

    # Leaving the `with` by an exception closes the stream too, which publishes what was
    # written so far: the stream alone is no atomic commit.
    partial = s3.path("partial.bin")
    with pytest.raises(RuntimeError), s3.fs.open_output_stream(partial) as out:
        out.write(b"half")
        raise RuntimeError
    assert s3.fs.get_file_info(partial).size == 4
