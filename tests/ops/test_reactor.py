"""
The gateway's reactor: ready descriptors dispatched without the legacy log
context, one descriptor's error logged without stopping the others, and
installed only when no reactor was chosen before.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet.abstract import FileDescriptor
from twisted.python import log as legacy_log
from twisted.trial.unittest import SynchronousTestCase

from llmgate.ops import reactor as lean


class _Reader(FileDescriptor):
    def __init__(self, sock: socket.socket, reactor: Any, fail: bool = False) -> None:
        super().__init__(reactor)
        self.sock = sock
        self.fail = fail
        self.reads: list[bytes] = []

    def fileno(self) -> int:
        return self.sock.fileno()

    def doRead(self) -> None:
        data = self.sock.recv(100)
        self.reads.append(data)
        if self.fail:
            raise ZeroDivisionError("boom")

    def logPrefix(self) -> str:
        raise AssertionError("the lean reactor does not ask for a log prefix")


class LeanReactorTests(SynchronousTestCase):
    def setUp(self) -> None:
        if lean.EPollReactor is None:
            raise self.skipTest("no epoll on this platform")
        self.reactor = lean.LeanEPollReactor()
        self.addCleanup(self.reactor._poller.close)

    def pair(self, fail: bool = False) -> tuple[_Reader, socket.socket]:
        a, b = socket.socketpair()
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        reader = _Reader(a, self.reactor, fail)
        self.reactor.addReader(reader)
        self.addCleanup(self.reactor.removeReader, reader)
        return reader, b

    def test_ready_descriptors_are_read_without_log_context(self) -> None:
        """Each ready descriptor is read once per poll; no logPrefix or legacy context is involved."""
        seen: list[Any] = []
        first, w1 = self.pair()
        second, w2 = self.pair()
        self.patch(legacy_log, "callWithLogger", lambda *a, **kw: seen.append(a))
        w1.send(b"one")
        w2.send(b"two")
        self.reactor.doPoll(0)
        self.assertEqual((first.reads, second.reads), ([b"one"], [b"two"]))
        self.assertEqual(seen, [])

    def test_an_error_is_logged_and_the_loop_goes_on(self) -> None:
        """A descriptor's error is handled as Twisted handles it (logged, that connection lost); the others are still read."""
        bad, w1 = self.pair(fail=True)
        good, w2 = self.pair()
        w1.send(b"x")
        w2.send(b"y")
        self.reactor.doPoll(0)
        self.assertEqual((bad.reads, good.reads), ([b"x"], [b"y"]))
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_a_call_every_so_many_descriptors_across_turns(self) -> None:
        """
        everyDescriptors(n, f) calls f after every n ready descriptors
        handled, counting on from one turn to the next; an error in f is
        logged and the descriptors are still handled; None stops the calls.
        """
        calls: list[int] = []
        pairs = [self.pair() for _ in range(3)]
        self.reactor.everyDescriptors(2, lambda: calls.append(1))
        for _, w in pairs:
            w.send(b"a")
        self.reactor.doPoll(0)
        self.assertEqual(calls, [1])
        pairs[0][1].send(b"b")
        self.reactor.doPoll(0)
        self.assertEqual(calls, [1, 1])

        def fail() -> None:
            raise ZeroDivisionError("hook")

        self.reactor.everyDescriptors(1, fail)
        pairs[1][1].send(b"c")
        self.reactor.doPoll(0)
        self.assertEqual(pairs[1][0].reads, [b"a", b"c"])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.reactor.everyDescriptors(1, None)
        pairs[2][1].send(b"d")
        self.reactor.doPoll(0)
        self.assertEqual(pairs[2][0].reads, [b"a", b"d"])
        self.assertEqual(calls, [1, 1])

    def test_chosen_types_are_handled_last_in_a_turn(self) -> None:
        """
        With handleLast(T), ready descriptors of type T are handled after
        all the others in the same turn, whatever epoll's order; without it
        every ready descriptor is still handled once.
        """
        order: list[str] = []

        class Late(_Reader):
            def doRead(self) -> None:
                super().doRead()
                order.append("late")

        class Early(_Reader):
            def doRead(self) -> None:
                super().doRead()
                order.append("early")

        writers = []
        for cls in (Late, Early, Late, Early):
            a, b = socket.socketpair()
            self.addCleanup(a.close)
            self.addCleanup(b.close)
            reader = cls(a, self.reactor)
            self.reactor.addReader(reader)
            self.addCleanup(self.reactor.removeReader, reader)
            writers.append(b)
        self.reactor.handleLast(Late)
        for w in writers:
            w.send(b"x")
        self.reactor.doPoll(0)
        self.assertEqual(order, ["early", "early", "late", "late"])
        self.reactor.handleLast()
        del order[:]
        for w in writers:
            w.send(b"y")
        self.reactor.doPoll(0)
        self.assertEqual(sorted(order), ["early", "early", "late", "late"])

    def test_not_installed_over_a_chosen_reactor(self) -> None:
        """With a reactor already installed (here trial's), install() leaves it alone."""
        from twisted.internet import reactor

        self.assertFalse(lean.install())
        from twisted.internet import reactor as after

        self.assertIs(after, reactor)
