"""A real Google Cloud Storage server for the tests: gcp-storage-emulator (its JSON API and uploads over
plain HTTP) on 127.0.0.1, the port chosen by the kernel, one bucket, in memory. Ready in under a second.

gcsfs reaches it through `STORAGE_EMULATOR_HOST` (or `endpoint_url`), and must be told
`GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false` before it is imported: its default filesystem first asks each
bucket's layout over gRPC, which an emulator does not answer, and asks again on every call (a minute each).
"""

from __future__ import annotations

import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path

from serverprocess import ServerProcess, free_port

BUCKET = "runs"
PROJECT = "ckptavg-test"
# the environment gcsfs needs for it (set before gcsfs is first imported), beside STORAGE_EMULATOR_HOST
GCSFS_ENV = {"GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}


class GCSServer(ServerProcess):
    """`with GCSServer(folder) as gcs:` a running server; `gcs.options` are fsspec's storage options for it."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.port = free_port()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def options(self) -> dict:
        return {"endpoint_url": self.endpoint, "token": "anon", "project": PROJECT}

    def __enter__(self) -> GCSServer:
        emulator = shutil.which("gcp-storage-emulator")
        if emulator is None:
            raise RuntimeError("no `gcp-storage-emulator` on PATH (pip install gcp-storage-emulator)")
        self.folder.mkdir(parents=True, exist_ok=True)
        self._spawn([emulator, "start", "--host=127.0.0.1", f"--port={self.port}", "--in-memory",
                     f"--default-bucket={BUCKET}"], "gcs.log")
        deadline = time.time() + 30
        while True:
            self._check_running()
            try:
                urllib.request.urlopen(f"{self.endpoint}/storage/v1/b/{BUCKET}", timeout=1)
                return self
            except (urllib.error.URLError, OSError):
                if time.time() > deadline:
                    self.__exit__(None, None, None)
                    raise RuntimeError("gcp-storage-emulator did not answer within 30 s") from None
                time.sleep(0.05)
