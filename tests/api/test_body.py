"""
Tests for L{llmgate.api.body}: strict enough that the gateway and the
upstream read the same request from the same bytes.
"""

from __future__ import annotations

import json

from twisted.trial.unittest import SynchronousTestCase

from llmgate.api.body import MAX_DEPTH, BodyError, parse_body


def nested(depth: int) -> bytes:
    """An object whose C{x} value makes the document C{depth} levels deep."""
    inner = "[" * (depth - 1) + "]" * (depth - 1)
    return ('{"model":"m","x":' + inner + "}").encode()


class ParseTests(SynchronousTestCase):
    def test_same_document_as_json_loads(self) -> None:
        """A valid body gives the same document as json.loads, nested values included."""
        raw = b' {"model": "gpt-4o", "stream": true, "n": 1.5, "messages": [{"role": "user", "content": "h\\u00e9"}], "x": null, "e": {}} '
        self.assertEqual(parse_body(raw), json.loads(raw))
        self.assertEqual(parse_body(b"{}"), {})
        self.assertEqual(parse_body('{"a":"\u00e9"}'.encode("utf-16")), {"a": "\u00e9"})

    def test_every_json_encoding(self) -> None:
        """
        A body in UTF-8 (with or without a BOM), UTF-16 or UTF-32 (either
        byte order, with or without a BOM) is read as json.loads reads it:
        one opening with "{" is UTF-8 only if its next byte is no NUL.
        """
        doc = {"model": "gpt-4o", "messages": [{"role": "user", "content": "h\u00e9 \U0001f600"}]}
        text = json.dumps(doc, ensure_ascii=False)
        for encoding in ("utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le", "utf-32-be"):
            raw = text.encode(encoding)
            self.assertEqual(parse_body(raw), json.loads(raw), encoding)
            self.assertEqual(parse_body(raw), doc, encoding)
        self.assertEqual(parse_body(b"{}"), {})
        with self.assertRaises(BodyError):
            parse_body(b"{")
        with self.assertRaises(BodyError):
            parse_body(b'{"a":"\xff"}')  # not UTF-8

    def test_invalid_json(self) -> None:
        """Bad JSON, bad UTF-8, trailing data and non-objects are refused."""
        for raw in (b"{nope", b'{"model": "\xff"}', b'{"a":1} x', b'{"a":1,}', b'{"a" 1}', b"", b"[1, 2]", b'"s"', b'{"a":1', b"{,}"):
            with self.assertRaises(BodyError, msg=raw):
                parse_body(raw)

    def test_not_an_object_says_so(self) -> None:
        """Valid JSON that is not an object gets its own message."""
        with self.assertRaises(BodyError) as e:
            parse_body(b"[1, 2]")
        self.assertIn("must be a JSON object", str(e.exception))


class DuplicateKeyTests(SynchronousTestCase):
    def test_repeated_top_level_key(self) -> None:
        """A top-level key given twice is refused, naming the key."""
        for key in ("model", "stream", "stream_options", "max_tokens", "anything"):
            raw = f'{{"{key}": 1, "messages": [], "{key}": 2}}'.encode()
            with self.assertRaises(BodyError, msg=key) as e:
                parse_body(raw)
            self.assertIn(f'duplicate key "{key}"', str(e.exception))
            self.assertEqual(e.exception.param, key)

    def test_escaped_spelling_is_the_same_key(self) -> None:
        """C{"mod\\u0065l"} is C{"model"}: a second spelling is still a repeat."""
        with self.assertRaises(BodyError) as e:
            parse_body(b'{"model": "cheap", "mod\\u0065l": "expensive"}')
        self.assertEqual(e.exception.param, "model")
        with self.assertRaises(BodyError):
            parse_body(b'{"\\u0073tream": false, "stream": true}')

    def test_nested_repeats_are_the_upstream_business(self) -> None:
        """Only the top level, which the gateway acts on, is checked."""
        doc = parse_body(b'{"model": "m", "tools": [{"a": 1, "a": 2}]}')
        self.assertEqual(doc["tools"], [{"a": 2}])


class DepthTests(SynchronousTestCase):
    def test_recursion_limit_is_400_material(self) -> None:
        """100000 nested brackets raise BodyError, never RecursionError."""
        for raw in (b"[" * 100000, b'{"model":"m","x":' + b"[" * 100000, b'{"a":' * 100000):
            with self.assertRaises(BodyError):
                parse_body(raw)

    def test_depth_cap(self) -> None:
        """
        A document C{MAX_DEPTH} deep parses; one level more is refused,
        though well within what json.loads accepts.
        """
        self.assertEqual(MAX_DEPTH, 128)
        self.assertEqual(parse_body(nested(128))["model"], "m")
        json.loads(nested(129))
        with self.assertRaises(BodyError) as e:
            parse_body(nested(129))
        self.assertIn("nested deeper than 128", str(e.exception))

    def test_many_brackets_shallow(self) -> None:
        """Many containers side by side are not depth."""
        raw = json.dumps({"model": "m", "x": [[{}] for _ in range(1000)], "s": "[" * 500}).encode()
        self.assertEqual(len(parse_body(raw)["x"]), 1000)
