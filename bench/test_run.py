# -*- test-case-name: bench.test_run -*-
"""Tests of the benchmark runner's own logic (stdlib unittest).

    .venv/bin/python -m unittest discover -s bench -p 'test_*.py'

The tests that drive the Go load generator are skipped when bench/bin/ has
not been built (`bench/run.py --smoke` builds it when `go` is installed).
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run  # noqa: E402


def fake_proc(root, table):
    """A /proc look-alike: table maps pid -> ppid; each gets a stat file."""
    for pid, ppid in table.items():
        os.makedirs(os.path.join(root, str(pid)))
        with open(os.path.join(root, str(pid), "stat"), "w") as f:
            # the command name may hold spaces and parentheses
            f.write("%d (twistd (x) y) S %d 1 1 0 -1 0 0 0 0 0 7 3 2 1 20 0 1 0\n" % (pid, ppid))
    os.makedirs(os.path.join(root, "self"))


class ProcessTreeTests(unittest.TestCase):
    def setUp(self):
        self.proc = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.proc)

    def test_descendants_follow_ppid(self):
        """A peer's tree is its pid, its children and their children; not its
        parent, siblings or unrelated processes."""
        fake_proc(self.proc, {1: 0, 10: 1, 20: 10, 21: 10, 30: 20, 40: 1, 41: 40})
        self.assertEqual(sorted(run.descendants(20, self.proc)), [20, 30])
        self.assertEqual(sorted(run.descendants(10, self.proc)), [10, 20, 21, 30])
        self.assertEqual(run.descendants(41, self.proc), [41])

    def test_stat_fields_after_command_name(self):
        """The ppid is read after the last ')' so a command name with spaces
        and parentheses does not shift the fields."""
        line = "5 (a) b (c)) S 4 5 5 0 -1 0 0 0 0 0 7 3 2 1 20"
        fields = run._stat_fields(line)
        self.assertEqual(fields[1], "4")
        self.assertEqual(fields[11:15], ["7", "3", "2", "1"])

    def test_tree_sample_sums_processes(self):
        """RSS, peak RSS and CPU are summed over the live processes of the tree;
        a process gone between the scan and the sample is left out."""
        samples = {1: (1000, 1500, 2.0), 2: (300, 400, 0.5), 3: (200, 250, 0.25), 4: None}
        self.assertEqual(run.tree_sample([1, 2, 3, 4], samples.get), (1500, 2150, 2.75, 3))
        self.assertIsNone(run.tree_sample([4], samples.get))

    def test_sampler_sums_real_children(self):
        """The sampler counts a real parent and its two children (a stand-in
        for llmgate --workers 2): three processes, RSS above the parent's own."""
        parent = subprocess.Popen(["/bin/sh", "-c", "sleep 30 & sleep 30 & wait"],
                                  start_new_session=True)
        self.addCleanup(lambda: (os.killpg(parent.pid, 15), parent.wait()))
        deadline = time.monotonic() + 5
        while len(run.descendants(parent.pid)) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        sampler = run.Sampler({"peer": parent.pid}, interval=0.02)
        sampler.start()
        time.sleep(0.2)
        samples = sampler.finish()["peer"]
        self.assertTrue(samples)
        t, rss, hwm, cpu, nproc = samples[-1]
        self.assertEqual(nproc, 3)
        self.assertGreater(rss, run.proc_sample(parent.pid)[0])

    def test_peak_rss_of_a_tree_uses_sampled_sums(self):
        """For a tree the peak RSS is the highest sampled sum (the sum of the
        processes' own peaks would overstate it); for one process its VmHWM
        counts too. The per-stream figure uses the summed RSS."""
        lg = {"launched": 10, "ok_streams": 10, "errors": 0, "error_kinds": {}, "events": 540,
              "tokens_received": 500, "peak_open": 10, "wall_s": 2.0, "ttft_ms": {}, "gap_ms": {},
              "loadgen_cpu_s": 0.1, "open_timeline": [[0.0, 10], [5.0, 10]]}
        tree = [(1.0, 3072, 9000, 1.0, 3), (2.0, 4096, 9000, 1.5, 3)]
        m = run.summarize(lg, tree, 2048, [], {})
        self.assertEqual(m["peak_rss_mb"], 4.0)
        self.assertEqual(m["peer_processes"], 3)
        self.assertEqual(m["rss_kb_per_stream"], (3584 - 2048) / 10)
        self.assertEqual(m["cpu_s_per_1k_req"], 50.0)
        one = [(1.0, 3072, 9000, 1.0, 1), (2.0, 4096, 9000, 1.5, 1)]
        self.assertEqual(run.summarize(lg, one, 2048, [], {})["peak_rss_mb"], 9000 / 1024)


class SettleTests(unittest.TestCase):
    def test_settle_waits_for_a_busy_tree(self):
        """settle() returns only once the tree stops using CPU: a child that
        spins for ~0.6 s holds it that long (bounded by the limit)."""
        parent = subprocess.Popen([sys.executable, "-c",
                                   "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', "
                                   "'import time\\nt=time.time()\\nwhile time.time()-t<0.6: pass']).wait(); "
                                   "time.sleep(30)"], start_new_session=True)
        self.addCleanup(lambda: (os.killpg(parent.pid, 15), parent.wait()))
        time.sleep(0.15)
        t0 = time.monotonic()
        run.settle(parent.pid, 3.0, step=0.1, busy=0.005)
        self.assertGreater(time.monotonic() - t0, 0.3)
        self.assertLess(time.monotonic() - t0, 3.0)

    def test_settle_returns_for_an_idle_process(self):
        """An idle process is settled at the first check."""
        p = subprocess.Popen(["sleep", "30"], start_new_session=True)
        self.addCleanup(lambda: (p.kill(), p.wait()))
        time.sleep(0.05)
        t0 = time.monotonic()
        run.settle(p.pid, 3.0, step=0.1)
        self.assertLess(time.monotonic() - t0, 0.5)


class PeerTests(unittest.TestCase):
    def test_workers_peer_unavailable_without_option(self):
        """llmgate-w2 is reported unavailable when llmgate has no --workers; the
        single-process peers then get no extra argument."""
        with self.assertRaises(run.Unavailable):
            run.llmgate_workers_args("llmgate-w2", False)
        self.assertEqual(run.llmgate_workers_args("llmgate", False), [])

    def test_workers_arguments_with_option(self):
        """With --workers, llmgate-w2 runs two workers and llmgate/llmgate-bare
        are pinned to one process (the option's default may be one per CPU)."""
        self.assertEqual(run.llmgate_workers_args("llmgate-w2", True), ["--workers", "2"])
        self.assertEqual(run.llmgate_workers_args("llmgate", True), ["--workers", "1"])
        self.assertEqual(run.llmgate_workers_args("llmgate-bare", True), ["--workers", "1"])

    def test_workers_peer_only_when_asked(self):
        """The default peer list leaves llmgate-w2 out; it is a known peer."""
        self.assertNotIn("llmgate-w2", run.DEFAULT_PEERS)
        self.assertIn("llmgate-w2", run.ALL_PEERS)

    def test_unavailable_is_not_a_smoke_failure(self):
        """An unavailable peer is shown in the table and does not fail --smoke,
        while a failed one does."""
        results = {"S1": {"llmgate-w2": run.median_of([{"unavailable": "no --workers"}])}}
        self.assertEqual(run.smoke_check(results), [])
        self.assertIn("UNAVAILABLE: no --workers",
                      run.markdown(results, run.scenarios(1.0, True)))
        self.assertTrue(run.smoke_check({"S1": {"llmgate": {"failed": "boom"}}}))


class ScenarioTests(unittest.TestCase):
    def test_sustained_and_short_arguments(self):
        """SUS holds 1,000 streams for 30 s, ramped over one stream's length;
        SHORT starts 500 5-token requests a second for 20 s, open loop."""
        sc = run.scenarios(1.0, False)
        argv, limit = run.loadgen_argv("http://x", sc["SUS"], 1, False)
        self.assertEqual(argv[argv.index("-c") + 1], "1000")
        self.assertEqual(argv[argv.index("-hold") + 1], "30.000s")
        self.assertEqual(argv[argv.index("-ramp") + 1], "5.000s")
        self.assertGreater(limit, 30 + 5)
        argv, limit = run.loadgen_argv("http://x", sc["SHORT"], 1, False)
        self.assertEqual(argv[argv.index("-rate") + 1], "500")
        self.assertEqual(argv[argv.index("-duration") + 1], "20.000s")
        self.assertEqual(argv[argv.index("-tokens") + 1], "5")
        self.assertGreater(limit, 20)

    def test_smoke_covers_every_scenario_briefly(self):
        """--smoke runs every scenario, each starting streams for at most ~1 s."""
        sc = run.scenarios(1.0, True)
        self.assertEqual(set(run.DEFAULT_SCENARIOS), set(sc))
        for name, s in sc.items():
            self.assertLessEqual(s.get("hold") or s.get("duration") or s["ramp"], 1.0, name)
            self.assertLessEqual(s["c"], 5, name)

    def test_scale_multiplies_short_rate(self):
        """--scale multiplies SHORT's arrival rate (it has no stream count)."""
        self.assertEqual(run.scenarios(0.5, False)["SHORT"]["rate"], 250.0)


@unittest.skipUnless(os.path.exists(os.path.join(run.BIN, "loadgen")) and
                     os.path.exists(os.path.join(run.BIN, "upstream")), "bench/bin not built")
class LoadgenModeTests(unittest.TestCase):
    """The Go load generator's -hold and -rate modes against the Go mock upstream."""

    def setUp(self):
        self.port = run.free_port()
        self.log = tempfile.NamedTemporaryFile(delete=False)
        self.addCleanup(os.unlink, self.log.name)
        self.up = run.start([os.path.join(run.BIN, "upstream"), "-addr", "127.0.0.1:%d" % self.port],
                            self.log.name)
        self.addCleanup(run.stop, self.up)
        run.wait_port(self.port, 10, self.up)
        self.url = "http://127.0.0.1:%d/v1/chat/completions" % self.port

    def loadgen(self, *args):
        out = subprocess.run([os.path.join(run.BIN, "loadgen"), "-url", self.url, "-timeline", "0"]
                             + list(args), capture_output=True, timeout=60, check=True).stdout
        return json.loads(out)

    def test_hold_restarts_streams(self):
        """-hold: each of the -c clients starts a new stream when its stream
        ends, until the hold is over: many more streams than clients, never
        more than -c open at once, all complete."""
        r = self.loadgen("-c", "3", "-tokens", "2", "-delay-ms", "20", "-ramp", "0.05s", "-hold", "1s")
        # a stream lasts ~60 ms (first delay + 2 tokens): ~16 per client in 1 s
        self.assertGreaterEqual(r["launched"], 3 * 8)
        self.assertLessEqual(r["peak_open"], 3)
        self.assertEqual(r["ok_streams"], r["launched"])
        self.assertEqual(r["errors"], 0)

    def test_rate_is_open_loop(self):
        """-rate R -duration D starts R x D streams at fixed times, not waiting
        for completions: with streams of ~0.5 s at 40/s, ~20 are open at once."""
        r = self.loadgen("-rate", "40", "-duration", "1s", "-tokens", "4", "-delay-ms", "100")
        self.assertEqual(r["launched"], 40)
        self.assertEqual(r["ok_streams"], 40)
        self.assertGreaterEqual(r["peak_open"], 12)
        # started within the second, ended ~0.5 s later (closed loop would take 40 x 0.5 s)
        self.assertLess(r["wall_s"], 5)

    def test_default_is_one_stream_per_client(self):
        """Without -hold or -rate each client opens exactly one stream (S1-S5)."""
        r = self.loadgen("-c", "4", "-tokens", "2", "-delay-ms", "5", "-ramp", "0.05s")
        self.assertEqual(r["launched"], 4)
        self.assertEqual(r["ok_streams"], 4)


if __name__ == "__main__":
    unittest.main()
