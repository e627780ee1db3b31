# -*- test-case-name: tests.edge.test_site -*-
"""
A site-wide budget for the request bodies being received at once.

The body cap bounds one request; this bounds them all together, so that many
clients uploading large bodies at the same time cannot take the gateway's
memory (each body is held in memory until it is handed to the resource).
"""

from __future__ import annotations

# 256 MiB: eight bodies at the default 32 MiB cap, thousands of ordinary
# prompts.
MAX_BUFFERED_BYTES = 256 * 1024 * 1024


class BodyBudget:
    """
    Bytes of request bodies held by requests whose body is being received.

    A request takes its announced C{Content-Length} when its headers arrive
    (or each chunk as it arrives, for a chunked body) and gives it all back
    when it is handed to the resource, refused, or its connection is lost.
    """

    def __init__(self, limit: int = MAX_BUFFERED_BYTES) -> None:
        self.limit = limit
        self.used = 0

    def take(self, n: int) -> bool:
        """Take C{n} bytes if they fit; whether they did."""
        if self.used + n > self.limit:
            return False
        self.used += n
        return True

    def give(self, n: int) -> None:
        """Give back C{n} bytes taken before."""
        self.used -= n
