"""The process behind `relaygen serve`: uvicorn serving the app, with a bound on its
connections and the two deadlines uvicorn's HTTP/1.1 protocol lacks.

uvicorn (h11) arms its keep-alive timer only once a response is over, and any byte
received cancels it: a connection that sends half a request head, or one byte a minute,
stays open for good, and so does a fresh connection that sends nothing. Connection adds
a deadline for the head, from the connection's start or the first byte of a request
after a response. And uvicorn's `send` waits for as long as the client's socket stays
full: a client that stops reading held its response, its relay and its queued deltas
forever. Connection cuts off a response whose writes stay paused past a deadline, which
stops its relay like a client that left.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Mapping
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from relaygen_sgl.core.cues import CueProfile
from relaygen_sgl.serve.app import ServeSettings, create_app
from relaygen_sgl.serve.observe import KEY, Outcome
from relaygen_sgl.serve.protocol import ApiError

KEEP_ALIVE_S = 30  # an idle keep-alive connection is closed after this


class Connection(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a deadline for a request's head and one for a
    response its client stopped reading, and its connection limit answered in OpenAI's shape
    (class attributes: each server gets a subclass)."""

    header_timeout_s = 10.0
    send_timeout_s = 30.0
    # past this many connections (or requests running), a request gets 503 with an OpenAI error
    # body; uvicorn's own limit_concurrency answers plain text, which OpenAI clients cannot read
    connection_limit: int | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None
        self._send_timer: asyncio.TimerHandle | None = None
        if self.connection_limit is not None:
            self.app = self._limited(self.app)

    def _limited(self, app: Any) -> Any:
        async def limited(scope: Any, receive: Any, send: Any) -> None:
            # counted as uvicorn counts them, but here this connection and this request's task are
            # already in: past the limit is more than it
            limit = self.connection_limit
            if scope["type"] == "http" and (len(self.connections) > limit or len(self.tasks) > limit):
                self.logger.warning("Exceeded concurrency limit.")
                err = ApiError(503, f"the server holds {limit} connections at most; retry later", "server_error",
                               code="too_many_connections", headers={"connection": "close"})
                await err.response()(scope, receive, send)
                return
            await app(scope, receive, send)

        return limited

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._await_head()

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE:
            self._await_head()
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the head is in
            self._head_timer = _cancel(self._head_timer)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.conn.their_state is h11.IDLE and self.conn.trailing_data[0]:  # part of the next head is in
            self._await_head()

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._send_timer is None:
            self._send_timer = self.loop.call_later(self.send_timeout_s, self._send_late)

    def resume_writing(self) -> None:
        super().resume_writing()
        self._send_timer = _cancel(self._send_timer)

    def connection_lost(self, exc: Exception | None) -> None:
        self._head_timer = _cancel(self._head_timer)
        self._send_timer = _cancel(self._send_timer)
        super().connection_lost(exc)

    def _await_head(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_late)

    def _head_late(self) -> None:
        self._head_timer = None
        if self.conn.their_state is h11.IDLE:
            try:
                self.timeout_keep_alive_handler()  # closes the connection, as for an idle keep-alive one
            except h11.LocalProtocolError:
                self.transport.close()

    def _send_late(self) -> None:
        self._send_timer = None
        if not self.flow.write_paused or self.transport.is_closing():
            return
        out = self.scope.get(KEY) if self.scope is not None else None
        if isinstance(out, Outcome) and not out.note:
            out.note = f"client read nothing for {self.send_timeout_s:g} s: cut off"
        self.transport.abort()  # its write buffer is dropped; the app sees the client gone
        if isinstance(out, Outcome) and out.job is not None:
            # now, not when the app next looks for the client: until then its stream would
            # go on taking the relay's deltas into a connection that is gone
            out.job.stop("disconnect")


def _cancel(timer: asyncio.TimerHandle | None) -> None:
    if timer is not None:
        timer.cancel()


def uvicorn_config(app: Any, host: str, port: int, s: ServeSettings) -> uvicorn.Config:
    """How `serve` runs `app`: uvicorn's own access log off (the app logs each request),
    its warnings on."""
    protocol = type("Connection", (Connection,), {"header_timeout_s": s.header_timeout_s,
                                                  "send_timeout_s": s.send_timeout_s,
                                                  "connection_limit": s.connection_limit})
    return uvicorn.Config(app, host=host, port=port, http=protocol, limit_concurrency=None,
                          timeout_keep_alive=KEEP_ALIVE_S, timeout_graceful_shutdown=10, log_level="warning",
                          access_log=False)


def serve(relay: Any, host: str, port: int, settings: ServeSettings | None = None, *, api_key: str | None = None,
          profiles: Mapping[str, CueProfile] | None = None) -> None:
    s = settings or ServeSettings()
    app = create_app(relay, s, api_key=api_key, profiles=profiles)
    # our own lines (the access log at info) to stderr; uvicorn's only from warning up
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("relaygen.serve")
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    root.propagate = False
    uvicorn.Server(uvicorn_config(app, host, port, s)).run()
