"""Fault injection: make matching requests fail the way Discord and Cloudflare fail.

429s carry every header Discord sends, including ``Via`` (discord.py treats a 429 without it as
a Cloudflare ban and raises instead of waiting), so tests exercise the client's real retry path.
"""

from __future__ import annotations

import asyncio
import math
import re
import secrets
import time
from dataclasses import dataclass, field

from aiohttp import web

from .http_json import json_response


@dataclass
class FaultRule:
    """Fail the next ``count`` requests whose method and API path match (count None = forever)."""

    method: str | None
    pattern: re.Pattern[str]
    status: int | None
    count: int | None
    retry_after: float = 0.05
    scope: str = "user"
    is_global: bool = False
    delay: float = 0.0
    hits: int = 0
    bucket: str = field(default_factory=lambda: secrets.token_hex(16))

    @property
    def exhausted(self) -> bool:
        return self.count is not None and self.hits >= self.count

    def matches(self, method: str, path: str) -> bool:
        if self.exhausted:
            return False
        if self.method not in (None, "*") and self.method.upper() != method.upper():
            return False
        return self.pattern.search(path) is not None


class FaultInjector:
    def __init__(self) -> None:
        self.rules: list[FaultRule] = []

    def add(
        self,
        method: str | None,
        path: str,
        *,
        status: int | None = 429,
        count: int | None = 1,
        retry_after: float = 0.05,
        scope: str = "user",
        is_global: bool = False,
        delay: float = 0.0,
    ) -> FaultRule:
        rule = FaultRule(
            method=method,
            pattern=re.compile(path),
            status=status,
            count=count,
            retry_after=retry_after,
            scope=scope,
            is_global=is_global,
            delay=delay,
        )
        self.rules.append(rule)
        return rule

    def clear(self) -> None:
        self.rules.clear()

    def take(self, method: str, path: str) -> FaultRule | None:
        """The first live rule for this request, counting the hit."""
        for rule in self.rules:
            if rule.matches(method, path):
                rule.hits += 1
                return rule
        return None

    async def apply(self, rule: FaultRule) -> web.Response | None:
        """Sleep for the rule's delay, then return the failure (None: let the request through)."""
        if rule.delay:
            await asyncio.sleep(rule.delay)
        if rule.status is None:
            return None
        if rule.status == 429:
            return rate_limited(rule)
        if rule.status in (502, 504):
            return web.Response(
                status=rule.status,
                text=f"<html><body><h1>{rule.status} Bad Gateway</h1></body></html>",
                content_type="text/html",
            )
        return json_response({"message": f"{rule.status}: Internal Server Error", "code": 0}, status=rule.status)


def rate_limited(rule: FaultRule) -> web.Response:
    headers = {
        "Retry-After": str(max(1, math.ceil(rule.retry_after))),
        "X-RateLimit-Limit": "5",
        "X-RateLimit-Remaining": "0",
        "X-RateLimit-Reset": f"{time.time() + rule.retry_after:.3f}",
        "X-RateLimit-Reset-After": f"{rule.retry_after:.3f}",
        "X-RateLimit-Bucket": rule.bucket,
        "X-RateLimit-Scope": "global" if rule.is_global else rule.scope,
        "Via": "1.1 google",
    }
    if rule.is_global:
        headers["X-RateLimit-Global"] = "true"
    body = {
        "message": "You are being rate limited.",
        "retry_after": rule.retry_after,
        "global": rule.is_global,
    }
    return json_response(body, status=429, headers=headers)
