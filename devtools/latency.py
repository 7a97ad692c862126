"""A loopback TCP proxy that adds a fixed delay to every reply (dev tooling for benchmarks): a local
SeaweedFS answers in ~2 ms, a remote object store in 20-50 ms, and what concurrency hides is that
waiting. Bench numbers taken through it are labelled with the delay.

    with LatencyProxy(target_port=8333, delay=0.025) as p:
        p.url   # http://127.0.0.1:<port>, use as the S3 endpoint

Each chunk the server sends is held `delay` seconds before it is passed on (a small object's reply
is one chunk: one round trip's worth); requests go through at once. Binds 127.0.0.1 only."""
from __future__ import annotations

import asyncio
import threading


class LatencyProxy:
    def __init__(self, target_port: int, delay: float, target_host: str = "127.0.0.1"):
        self.target, self.delay = (target_host, int(target_port)), float(delay)
        self.port: int | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="latency-proxy", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "LatencyProxy":
        self._thread.start()
        server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._client, "127.0.0.1", 0), self._loop).result(10)
        self._server, self.port = server, server.sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        async def close():
            self._server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:             # the connections still open (a client's keep-alive pool)
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._server.wait_closed()
        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _client(self, reader, writer):
        try:
            up_r, up_w = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        try:
            await asyncio.gather(self._pipe(reader, up_w, 0.0), self._pipe(up_r, writer, self.delay),
                                 return_exceptions=True)
        except asyncio.CancelledError:  # stop(): ends normally (asyncio's stream callback would
            up_w.close()                # report a cancelled connection task as an error)
            writer.close()

    @staticmethod
    async def _pipe(src, dst, delay: float):
        try:
            while data := await src.read(1 << 16):
                if delay:
                    await asyncio.sleep(delay)
                dst.write(data)
                await dst.drain()
        finally:
            dst.close()

    def __enter__(self) -> "LatencyProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
