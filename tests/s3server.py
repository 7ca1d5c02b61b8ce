"""A real S3-compatible server on loopback for the tests: moto's server mode, in a thread.

Object-store paths (``s3://`` places, filesystems pickled to workers) are tested against it
rather than mocked: pyarrow speaks HTTP to it as to any S3 endpoint. It is a thread, not a child
process, because the suite's leak check fails a test that leaves a child behind. The catch: it
serves requests on this process's GIL, so a pyarrow call that holds the GIL while it waits on S3
stalls until curl gives up (about 30 s). The one known such call is an output stream finished by
its destructor instead of ``close()``. Workers are other processes and are not affected.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pyarrow.fs import S3FileSystem

__all__ = ["ACCESS_KEY", "REGION", "SECRET_KEY", "Bucket", "s3_filesystem", "s3_uri", "start"]

ACCESS_KEY = "testing"
SECRET_KEY = "testing"
REGION = "us-east-1"

ENV = {
    "AWS_ACCESS_KEY_ID": ACCESS_KEY,
    "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
    "AWS_EC2_METADATA_DISABLED": "true",
}
"""Environment for the test session: an S3 client given no keys finds these (and so does a
worker, which inherits them) and never asks the EC2 metadata service."""


def start() -> tuple[str, Callable[[], None]]:
    """Start a server on 127.0.0.1 and a free port: its endpoint (``host:port``) and the
    function that stops it. Takes a few milliseconds once moto is imported (about 0.6 s)."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request on stderr
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return f"{host}:{port}", server.stop


def s3_filesystem(endpoint: str) -> S3FileSystem:
    """A pyarrow filesystem on the server at `endpoint`, allowed to create and delete
    buckets. It pickles, and works after unpickling in another process."""
    from pyarrow import fs as pafs

    return pafs.S3FileSystem(
        access_key=ACCESS_KEY,
        secret_key=SECRET_KEY,
        region=REGION,
        endpoint_override=endpoint,
        scheme="http",
        allow_bucket_creation=True,
        allow_bucket_deletion=True,
    )


def s3_uri(endpoint: str, path: str) -> str:
    """An ``s3://`` URI for `path` (``bucket/prefix``) that ``pyarrow.fs.FileSystem.from_uri``
    resolves to the server at `endpoint`; it carries the keys, so it needs no environment."""
    query = f"endpoint_override={endpoint}&scheme=http&region={REGION}"
    return f"s3://{ACCESS_KEY}:{SECRET_KEY}@{path.strip('/')}?{query}"


@dataclass(frozen=True)
class Bucket:
    """One test's bucket on the server: `fs` (a `pyarrow.fs.S3FileSystem`), `bucket` (its
    name), `endpoint` (``host:port``)."""

    fs: S3FileSystem
    bucket: str
    endpoint: str

    @classmethod
    def create(cls, endpoint: str) -> Bucket:
        fs = s3_filesystem(endpoint)
        bucket = f"ashard-{uuid.uuid4().hex[:16]}"
        fs.create_dir(bucket)
        return cls(fs, bucket, endpoint)

    def path(self, prefix: str = "") -> str:
        """``bucket/prefix``: a path inside `fs`."""
        return f"{self.bucket}/{prefix.strip('/')}".rstrip("/")

    def uri(self, prefix: str = "") -> str:
        """``s3://...bucket/prefix?...``: a URI that resolves to this server."""
        return s3_uri(self.endpoint, self.path(prefix))

    def delete(self) -> None:
        """Remove the bucket and all it holds."""
        self.fs.delete_dir(self.bucket)
