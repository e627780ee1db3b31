# -*- test-case-name: tests.dialects.test_sse -*-
"""
Tests for L{llmgate.dialects.sse}.
"""

import os

from twisted.trial.unittest import SynchronousTestCase

from llmgate.dialects.sse import EventStreamParser, EventTooLarge

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "llmgate", "mock", "fixtures")
SSE_FIXTURES = sorted(f for f in os.listdir(FIXTURES) if f.endswith(".sse"))


def fixture(name: str) -> bytes:
    with open(os.path.join(FIXTURES, name), "rb") as f:
        return f.read()


def parse_sliced(data: bytes, size: int, parser=None) -> list:
    parser = parser or EventStreamParser()
    events = []
    for i in range(0, len(data), size):
        events.extend(parser.feed(data[i : i + size]))
    return events


class FixtureTests(SynchronousTestCase):
    def test_fixturesPresent(self):
        """
        All seventeen stream fixtures are found, the eight provider shapes
        and the 1-hour cache stream included (guards the loops below
        against silently testing nothing).
        """
        self.assertEqual(len(SSE_FIXTURES), 17)

    def test_slicedEqualsWhole(self):
        """
        Every fixture decodes to the same events fed whole and fed in slices
        of 1 to 7 bytes, which split lines, CRLFs and UTF-8 characters.
        """
        for name in SSE_FIXTURES:
            data = fixture(name)
            whole = EventStreamParser().feed(data)
            self.assertTrue(whole, name)
            for size in range(1, 8):
                self.assertEqual(parse_sliced(data, size), whole, (name, size))

    def test_crlfEqualsLf(self):
        """
        The CRLF fixture decodes to exactly the events of the LF one.
        """
        lf = EventStreamParser().feed(fixture("openai_chat_stream.sse"))
        crlf = EventStreamParser().feed(fixture("openai_chat_stream_crlf.sse"))
        self.assertEqual(len(lf), 18)
        self.assertEqual(crlf, lf)
        self.assertEqual(lf[-1], (None, b"[DONE]"))

    def test_namedEvents(self):
        """
        Anthropic events carry their name; the ping keeps its wire spacing.
        """
        events = EventStreamParser().feed(fixture("anthropic_messages_stream.sse"))
        self.assertEqual(events[0][0], b"message_start")
        self.assertIn((b"ping", b'{"type": "ping"}'), events)
        self.assertEqual(events[-1], (b"message_stop", b'{"type":"message_stop"}'))

    def test_truncatedDropsPartial(self):
        """
        The truncated fixture yields only its 7 complete events; the half
        line at EOF is dropped by close().
        """
        parser = EventStreamParser()
        events = parser.feed(fixture("openai_chat_stream_truncated.sse"))
        self.assertEqual(len(events), 7)
        parser.close()
        self.assertEqual(parser.feed(b"\n\n"), [])


class FramingTests(SynchronousTestCase):
    def test_multiLineData(self):
        """
        Several data lines are joined with LF.
        """
        self.assertEqual(
            EventStreamParser().feed(b"data: a\ndata:b\ndata:  c\n\n"),
            [(None, b"a\nb\n c")],
        )

    def test_oneSpaceStripped(self):
        """
        Only one space after the colon is removed; a line with no colon is
        a field with an empty value.
        """
        self.assertEqual(EventStreamParser().feed(b"data\n\n"), [(None, b"")])
        self.assertEqual(EventStreamParser().feed(b"data:  x \n\n"), [(None, b" x ")])

    def test_commentsAndUnknownFields(self):
        """
        Comment lines and unknown fields are ignored; a comment-only block
        dispatches nothing.
        """
        parser = EventStreamParser()
        self.assertEqual(parser.feed(b": keep-alive\n\n"), [])
        self.assertEqual(
            parser.feed(b"foo: bar\n: c\nevent: x\ndata: y\n\n"), [(b"x", b"y")]
        )

    def test_noDataNoEvent(self):
        """
        An event with a name but no data is not dispatched, and its name
        does not leak into the next event.
        """
        parser = EventStreamParser()
        self.assertEqual(parser.feed(b"event: a\n\ndata: b\n\n"), [(None, b"b")])

    def test_idAndRetry(self):
        """
        id sets last_event_id unless it contains NUL; retry needs digits.
        """
        parser = EventStreamParser()
        parser.feed(b"id: 7\nretry: 1500\ndata: x\n\n")
        self.assertEqual((parser.last_event_id, parser.retry), (b"7", 1500))
        parser.feed(b"id: a\0b\nretry: 1s\ndata: x\n\n")
        self.assertEqual((parser.last_event_id, parser.retry), (b"7", 1500))

    def test_loneCR(self):
        """
        A lone CR ends a line, and CR CR is a blank line.
        """
        self.assertEqual(
            EventStreamParser().feed(b"event: e\rdata: 1\r\rdata: 2\r\r"),
            [(b"e", b"1"), (None, b"2")],
        )

    def test_crlfSplitAcrossFeeds(self):
        """
        A CR ending one chunk and an LF starting the next are one line end,
        not a line end plus a blank line.
        """
        parser = EventStreamParser()
        self.assertEqual(parser.feed(b"data: a\r"), [])
        self.assertEqual(parser.feed(b"\ndata: b\r"), [])
        self.assertEqual(parser.feed(b""), [])
        self.assertEqual(parser.feed(b"\n\r"), [(None, b"a\nb")])
        self.assertEqual(parser.feed(b"\n"), [])

    def test_utf8Split(self):
        """
        A multi-byte character split across feeds comes out byte-exact.
        """
        payload = "data: 80\u2013100 \u00b0C \u2014 \U0001f30b\n\n".encode()
        for cut in range(len(payload)):
            parser = EventStreamParser()
            events = parser.feed(payload[:cut]) + parser.feed(payload[cut:])
            self.assertEqual(events, [(None, payload[6:-2])])
            events[0][1].decode("utf-8")

    def test_bom(self):
        """
        Two bytes of a BOM that are not followed by the third are data (so
        the first line is an unknown field); a BOM after the first byte of
        the stream is data too.
        """
        parser = EventStreamParser()
        self.assertEqual(parser.feed(b"\xef"), [])
        self.assertEqual(parser.feed(b"\xbbdata: x\n\n"), [])
        self.assertEqual(parser.feed(b""), [])
        parser = EventStreamParser()
        self.assertEqual(
            parser.feed(b"\xef\xbb\xbfdata: x\n\n\xef\xbb\xbfdata: y\n\n"), [(None, b"x")]
        )

    def test_bomSplitThreeWays(self):
        """
        A BOM split into single bytes is still stripped.
        """
        parser = EventStreamParser()
        events = []
        for b in b"\xef\xbb\xbfdata: x\n\n":
            events += parser.feed(bytes([b]))
        self.assertEqual(events, [(None, b"x")])

    def test_extraBlankLines(self):
        """
        Runs of blank lines between events dispatch nothing extra.
        """
        self.assertEqual(
            EventStreamParser().feed(b"\n\ndata: a\n\n\n\n\ndata: b\n\n\n"),
            [(None, b"a"), (None, b"b")],
        )

    def test_closeDropsPartialEvent(self):
        """
        close() drops complete-but-undispatched lines and a partial line.
        """
        parser = EventStreamParser()
        self.assertEqual(parser.feed(b"data: a\ndata: par"), [])
        parser.close()
        self.assertEqual(parser.feed(b"data: b\n\n"), [(None, b"b")])


class LimitTests(SynchronousTestCase):
    def test_eventTooLargeWhole(self):
        """
        A complete event over the cap raises EventTooLarge.
        """
        parser = EventStreamParser(max_event_bytes=100)
        self.assertEqual(parser.feed(b"data: " + b"x" * 80 + b"\n\n"), [(None, b"x" * 80)])
        exc = self.assertRaises(EventTooLarge, parser.feed, b"data: " + b"x" * 200 + b"\n\n")
        self.assertEqual(exc.limit, 100)

    def test_eventTooLargeLongLine(self):
        """
        An unterminated line growing past the cap raises before its end.
        """
        parser = EventStreamParser(max_event_bytes=100)
        parser.feed(b"data: ")
        with self.assertRaises(EventTooLarge):
            for _ in range(100):
                parser.feed(b"x" * 7)

    def test_eventTooLargeManyLines(self):
        """
        Many short data lines without a blank line count towards the cap.
        """
        parser = EventStreamParser(max_event_bytes=100)
        with self.assertRaises(EventTooLarge):
            for _ in range(100):
                parser.feed(b"data: x\n")

    def test_separateEventsUnderCap(self):
        """
        The cap is per event: many small events never trip it.
        """
        parser = EventStreamParser(max_event_bytes=20)
        events = parse_sliced(b"data: 0123456789\n\n" * 100, 7, parser)
        self.assertEqual(len(events), 100)
