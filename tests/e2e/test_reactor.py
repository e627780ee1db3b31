"""
End to end: C{twistd llmgate} runs on the gateway's epoll reactor unless
twistd is told another one.
"""

from __future__ import annotations

import tempfile

from twisted.trial.unittest import SynchronousTestCase

from tests.e2e.procs import Daemon


class ReactorChoiceTests(SynchronousTestCase):
    def start(self, twistd_args: tuple[str, ...] = ()) -> Daemon:
        gw = Daemon("llmgate", ["--demo", "--port", "tcp:0:interface=127.0.0.1"], tempfile.mkdtemp(), twistd_args=twistd_args)
        self.addCleanup(gw.stop)
        return gw

    def test_default_is_the_lean_epoll_reactor(self) -> None:
        """By default the daemon runs on LeanEPollReactor."""
        self.assertIn("reactor class: llmgate.ops.reactor.LeanEPollReactor", self.start().output())

    def test_twistd_reactor_option_wins(self) -> None:
        """twistd --reactor=poll is respected: the daemon runs on Twisted's poll reactor."""
        out = self.start(("--reactor", "poll")).output()
        self.assertIn("reactor class: twisted.internet.pollreactor.PollReactor", out)
