"""A real S3-protocol server for the tests: moto's standalone server (``python -m moto.server``)
on 127.0.0.1, in its own process, reached through a TCP relay (this file run as a script) in
another one.

Clients find it the standard way (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``): pyarrow, boto3 and, through the environment that a
Ray started after :meth:`S3Server.export_env` inherits, every Ray worker. :meth:`stop` stops the
endpoint (the relay: connections are refused, as by a server that is down) and :meth:`start`
starts it again on the same port; the buckets, in moto's process, stay.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
import urllib.request

REGION = "us-east-1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(cmd: list[str], url: str, timeout: float = 120) -> subprocess.Popen:
    """Start ``cmd`` in its own session; wait until ``url`` answers over HTTP."""
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return proc
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"{cmd} did not answer on {url}") from None
            time.sleep(0.2)


def _end(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.terminate()
        proc.wait(30)


class S3Server:
    def __init__(self):
        self.port, self._moto_port = free_port(), free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._moto = self._relay = None

    @property
    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "oclear-test",
            "AWS_SECRET_ACCESS_KEY": "oclear-test-secret",
            "AWS_REGION": REGION,
        }

    def export_env(self) -> None:
        os.environ.update(self.env)

    def start(self) -> S3Server:
        """Start moto (once) and the endpoint; return when the endpoint answers."""
        if self._moto is None:
            cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1"]
            moto = f"http://127.0.0.1:{self._moto_port}"
            self._moto = _spawn([*cmd, "-p", str(self._moto_port)], f"{moto}/moto-api/")
        relay = [sys.executable, __file__, str(self.port), str(self._moto_port)]
        self._relay = _spawn(relay, f"{self.endpoint}/moto-api/")
        return self

    def stop(self) -> None:
        """Stop the endpoint: connections to it are refused until :meth:`start`."""
        _end(self._relay)
        self._relay = None

    def close(self) -> None:
        self.stop()
        _end(self._moto)
        self._moto = None

    def bucket(self, name: str) -> str:
        """Create bucket ``name``; its ``s3://`` URI."""
        import boto3

        boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION).create_bucket(
            Bucket=name
        )
        return f"s3://{name}"


async def _relay(listen: int, target: int) -> None:
    """Forward every connection to ``listen`` to moto's port ``target``."""

    async def pipe(reader, writer):
        try:
            while data := await reader.read(1 << 16):
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()

    async def handle(client_reader, client_writer):
        reader, writer = await asyncio.open_connection("127.0.0.1", target)
        await asyncio.gather(pipe(client_reader, writer), pipe(reader, client_writer))

    server = await asyncio.start_server(handle, "127.0.0.1", listen)
    await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(_relay(int(sys.argv[1]), int(sys.argv[2])))
