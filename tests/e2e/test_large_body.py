# -*- test-case-name: tests.e2e.test_large_body -*-
"""
End to end: a non-streaming answer larger than any buffer the accounting
keeps still leaves the provider's usage in the ledger.
"""

from __future__ import annotations

import json
import os
import tempfile
import urllib.request

from twisted.trial.unittest import SynchronousTestCase

from llmgate.accounting.ledger import read_records
from tests.e2e.procs import Daemon, gateway_config


class LargeBodyTests(SynchronousTestCase):
    def test_18mb_embeddings_answer_keeps_reported_usage(self) -> None:
        """
        An 18 MB embeddings answer relayed by a real gateway reaches the
        client whole, and its ledger record has the usage the provider
        reported (not an estimate).
        """
        tmp = tempfile.mkdtemp(prefix="llmgate-e2e-")
        mock = Daemon("llmgate-mock", ["--port", "tcp:0:interface=127.0.0.1"], tmp)
        self.addCleanup(mock.stop)
        ledger = os.path.join(tmp, "usage.db")
        conf = os.path.join(tmp, "llmgate.toml")
        with open(conf, "w") as f:
            f.write(gateway_config(mock.port, f'[ledger]\npath = "{ledger}"\n'))
        gw = Daemon("llmgate", ["--config", conf, "--port", "tcp:0:interface=127.0.0.1"], tmp, env={"E2E_UPSTREAM_KEY": "k"})
        self.addCleanup(gw.stop)
        request = {"model": "text-embedding-3-small", "input": ["hello world"] * 2500, "dimensions": 1000}
        req = urllib.request.Request(
            gw.url("/v1/embeddings"), data=json.dumps(request).encode(), headers={"content-type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=60) as r:
            body = r.read()
        self.assertGreater(len(body), 17 * 1024 * 1024)
        answer = json.loads(body)
        self.assertEqual(len(answer["data"]), 2500)
        reported = answer["usage"]["prompt_tokens"]
        gw.stop()
        [rec] = read_records(ledger)
        self.assertEqual(
            (rec["input_tokens"], rec["output_tokens"], rec["source"], rec["outcome"], rec["bytes_out"]),
            (reported, 0, "reported", "completed", len(body)),
        )
