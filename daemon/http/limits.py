"""Request limits: the size of a request body and the requests one client may have in flight."""
from __future__ import annotations

from collections import Counter

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyTooLarge(HTTPException):
    """413: raised while the body is read, so the app's error handlers answer in the route's error shape."""

    def __init__(self, limit: int):
        super().__init__(413, f"the request body is larger than {limit} bytes ([serve] max_body_bytes)")


class BodyLimitMiddleware:
    """ASGI middleware refusing bodies over ``max_bytes``: a too large Content-Length fails the first read,
    and the bytes actually received are counted too (chunked uploads, or a Content-Length that lies)."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            declared = int(Headers(scope=scope).get("content-length", "0"))
        except ValueError:
            declared = 0
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            if declared > self.max_bytes:
                raise BodyTooLarge(self.max_bytes)
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, limited, send)


class ClientSlots:
    """At most ``limit`` requests in flight per client address. Used from the event loop thread only."""

    def __init__(self, limit: int):
        self.limit = limit
        self._busy: Counter[str] = Counter()

    def acquire(self, client: str) -> bool:
        if self._busy[client] >= self.limit:
            return False
        self._busy[client] += 1
        return True

    def release(self, client: str) -> None:
        self._busy[client] -= 1
        if self._busy[client] <= 0:
            del self._busy[client]

    def in_flight(self, client: str) -> int:
        return self._busy[client]
