# -*- test-case-name: tests.accounting.test_bigbody -*-
"""
Tests for L{llmgate.accounting.bigbody}: the top-level members of a JSON
object from its first and last bytes only, in bounded memory.
"""

from __future__ import annotations

import json
import random
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from llmgate.accounting.bigbody import HeadTail, head_members, members, tail_members

# Strings that look like JSON structure: escaped quotes, backslashes at the
# end, brackets, commas and a fake "usage" member.
TRICKY = [
    'a "usage": {"prompt_tokens": 999}, } ]',
    "ends in a backslash \\",
    "\\\\\\",
    '\\"',
    "{[,]}",
    "é漢🙂",
    "",
]


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode()


def random_value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(7 if depth < 3 else 4)
    if kind == 0:
        return rng.choice(TRICKY) + rng.choice(TRICKY)
    if kind == 1:
        return rng.randrange(-10**6, 10**6)
    if kind == 2:
        return rng.choice([True, False, None, 1.5e-7])
    if kind == 3:
        return "".join(rng.choice('ab"\\{},[]: é') for _ in range(rng.randrange(20)))
    if kind == 4:
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {
        rng.choice(["usage", "id", "x", 'k"q', "\\"]) + str(i): random_value(rng, depth + 1)
        for i in range(rng.randrange(4))
    }


class MembersTests(SynchronousTestCase):
    def test_chat_body(self) -> None:
        """
        From a long chat completion's first and last bytes: its id, model
        and top-level usage, not the fake usage inside the text.
        """
        body = dumps({
            "id": "chatcmpl-1", "model": "gpt-4o",
            "choices": [{"message": {"content": TRICKY[0] * 20000}}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 7},
            "system_fingerprint": "fp",
        })
        got = members(body[:4096], body[-4096:])
        self.assertEqual(got, {
            "id": "chatcmpl-1", "model": "gpt-4o", "system_fingerprint": "fp",
            "usage": {"prompt_tokens": 5, "completion_tokens": 7},
        })

    def test_nested_usage_is_not_top_level(self) -> None:
        """A "usage" key inside a member is not the body's usage."""
        body = dumps({"data": [{"usage": {"prompt_tokens": 1}}] * 1000, "model": "m"})
        self.assertEqual(members(body[:100], body[-100:]), {"model": "m"})

    def test_cut_values_are_dropped(self) -> None:
        """
        A member cut by the head's end or the tail's start is left out,
        even when what is left would parse (a shorter number).
        """
        body = b'{"id":"x","n":12345,"usage":{"a":1}}'
        self.assertEqual(head_members(body[:17]), {"id": "x"})
        self.assertEqual(tail_members(body[-20:]), {"usage": {"a": 1}})
        self.assertEqual(tail_members(body[-24:]), {"usage": {"a": 1}})

    def test_backslashes_at_the_tail_start(self) -> None:
        """
        A tail that starts in a run of backslashes cannot tell an escaped
        quote from a closing one: the member is dropped, not misread.
        """
        body = dumps({"a": "\\" * 10 + '"', "usage": 1})
        for cut in range(1, len(body) + 1):
            got = tail_members(body[-cut:])
            self.assertIn(got, ({}, {"usage": 1}, {"a": "\\" * 10 + '"', "usage": 1}), cut)

    def test_random_objects_every_cut(self) -> None:
        """
        For random objects full of structure-like strings, every head and
        tail length yields only true top-level members, and a head or tail
        holding the whole body yields all of them.
        """
        rng = random.Random(7)
        for _ in range(150):
            obj = {str(i) + rng.choice(["", "usage", '"']): random_value(rng) for i in range(rng.randrange(1, 6))}
            seps = (" ,\n ", " :\t") if rng.random() < 0.3 else (",", ":")
            body = json.dumps(obj, ensure_ascii=False, separators=seps).encode()
            self.assertEqual(head_members(body), obj)
            self.assertEqual(tail_members(body), obj)
            for cut in range(1, len(body)):
                for got in (head_members(body[:cut]), tail_members(body[-cut:])):
                    self.assertEqual({k: obj[k] for k in got}, got, (body, cut))

    def test_not_an_object(self) -> None:
        """HTML, arrays, empty bodies: no members, no exception."""
        for body in (b"", b"<html></html>", b"[1, 2]", b"{", b"}", b'"}"', b"{}"):
            self.assertEqual(members(body, body), {})


class HeadTailTests(SynchronousTestCase):
    def test_bounded_whatever_the_size(self) -> None:
        """
        Fed 20 MB in 64 KiB pieces (or in one piece), it holds at most its
        head, its tail and one piece, and gives back the exact ends.
        """
        body = bytes(range(256)) * (20 * 4096)
        for size in (65536, 1000, len(body)):
            ends = HeadTail(head=1000, tail=5000)
            peak = 0
            for i in range(0, len(body), size):
                ends.feed(body[i : i + size])
                peak = max(peak, ends.kept)
            self.assertLessEqual(peak, 1000 + 5000 + min(size, 5000))
            self.assertEqual(b"".join(ends._head), body[:1000])
            tail = b"".join(ends._tail)
            self.assertGreaterEqual(len(tail), 5000)
            self.assertTrue(body.endswith(tail))

    def test_members(self) -> None:
        """members() reads what the head and tail kept."""
        body = dumps({"id": "e", "data": [[0.5] * 100] * 3000, "usage": {"prompt_tokens": 9}})
        ends = HeadTail(head=100, tail=100)
        for i in range(0, len(body), 4096):
            ends.feed(body[i : i + 4096])
        self.assertEqual(ends.members(), {"id": "e", "usage": {"prompt_tokens": 9}})
