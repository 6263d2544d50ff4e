"""Resolve requests over MQTT that need the resolver: decode, resolve, answer on the requester's ``…/res`` topic.

These are the requests the device link (gateway/frontends/mqtt_link.py) does not answer from its table, or
every request when the front end runs without it. A request that does not decode is answered with a 4.00 error
when its token can be read, else counted and dropped. Up to ``max_inflight`` requests are resolved at once; more
are answered "rate limited" (ttl 1). A stopping front end answers "upstream unavailable". An OK or not-modified
answer is passed to ``learn`` (the device link's table) with the request's bytes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from gateway.frontends.common import InFlight, failure
from gateway.frontends.mqtt_answers import Tally, answer_fields, encode_answer
from gateway.logfmt import kv
from gateway.resolution import Answer, ResolutionNote, Resolving, resolve_noted
from proto import devicemsg, identifier

__all__ = ["Requests", "peek_token"]

log = logging.getLogger(__name__)

Learn = Callable[[bytes, Answer, tuple[str, ...], tuple[int, ...], bytes | None], object]


def peek_token(payload: bytes) -> bytes | None:
    """The token of a request that did not decode, if it can be read (so the error can still be matched)."""
    try:
        obj = devicemsg.loads(payload)
    except devicemsg.WireError:
        return None
    tok = obj.get(devicemsg.KEYS["token"]) if isinstance(obj, dict) else None
    return tok if isinstance(tok, bytes) and 1 <= len(tok) <= 8 else None


@dataclass(eq=False)
class Requests:
    """``handle(key, payload)`` for each request on ``ida/v1/d/<key>/req``; ``send(key, payload)`` publishes an
    answer on ``ida/v1/d/<key>/res``; ``spawn`` runs a coroutine as a task the front end cancels at stop."""

    resolver: Resolving
    tally: Tally
    send: Callable[[str, bytes], object]
    spawn: Callable[[Coroutine[Any, Any, None]], None]
    learn: Learn | None = None
    note: ResolutionNote | None = None  # the status page's list of recent resolutions
    clock: Callable[[], float] = time.time
    max_inflight: int = 512
    inflight: InFlight = field(default_factory=InFlight)
    closing: bool = False  # answer "shutting down" instead of resolving

    def handle(self, key: str, payload: bytes) -> None:
        try:
            fields = devicemsg.decode("resolve_request", payload)
        except devicemsg.WireError as e:
            token = peek_token(payload)
            log.info("mqtt bad resolve request %s", kv(key=key, error=e, answered=token is not None))
            if token is None:
                self.tally.dropped(devicemsg.BAD_REQUEST)
            else:
                self.reply(key, {"token": token, "code": devicemsg.BAD_REQUEST, "msg": str(e)})
            return
        token = fields["token"]
        if self.closing:
            self.reply(
                key,
                {"token": token, "code": devicemsg.UPSTREAM_UNAVAILABLE, "msg": "gateway is shutting down"},
            )
            return
        if self.inflight.count >= self.max_inflight:
            self.reply(
                key,
                {
                    "token": token,
                    "code": devicemsg.RATE_LIMITED,
                    "ttl": 1,
                    "msg": "too many requests in flight",
                },
            )
            return
        # Counted from now (not from when the task first runs), so a burst of requests sees the limit.
        self.inflight.__enter__()
        self.spawn(self._resolve(key, fields, payload))

    async def _resolve(self, key: str, fields: dict[str, Any], payload: bytes) -> None:
        token: bytes = fields["token"]
        try:
            try:
                handle = identifier.normalise(fields["id"])
                types, indexes = tuple(fields.get("types", ())), tuple(fields.get("indexes", ()))
                answer = await resolve_noted(self.resolver, self.note, "mqtt", handle, types, indexes)
                reply = answer_fields(token, answer, fields.get("etag"), self.clock())
                if self.learn is not None:
                    self.learn(payload, answer, types, indexes, fields.get("etag"))
            except asyncio.CancelledError:
                raise
            except Exception as e:
                code, msg = failure(e)
                reply = {"token": token, "code": code, "msg": msg}
                if code == devicemsg.BAD_REQUEST and len(fields["id"]) <= 255:
                    reply["id"] = fields["id"]
            self.reply(key, reply)
        finally:
            self.inflight.__exit__(None, None, None)

    def reply(self, key: str, fields: dict[str, Any]) -> None:
        """Publish an answer on the requester's ``res`` topic and count it."""
        payload, code = encode_answer(fields, key)
        self.send(key, payload)
        self.tally.code(code)
