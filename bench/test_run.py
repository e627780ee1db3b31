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


class PerSecondTests(unittest.TestCase):
    def test_per_second_series(self):
        """Once a second: the open streams at that time (the latest timeline
        value), the peer's RSS in MB and its CPU over the last second in % of
        one core (none for the first)."""
        samples = [(100.0, 1024, 0, 1.0, 5), (100.5, 2048, 0, 1.2, 5), (101.0, 4096, 0, 1.5, 5),
                   (102.0, 5120, 0, 3.0, 5)]
        timeline = [[99.9, 0], [100.9, 7], [101.9, 20]]
        self.assertEqual(run.per_second(samples, timeline),
                         [[0.0, 0, 1.0, None], [1.0, 7, 4.0, 50], [2.0, 20, 5.0, 150]])
        self.assertEqual(run.per_second(samples[:1], [])[0][1], 0)


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


def shard(start, wall, launched, ok, peak, timeline, kinds=None, **kw):
    """A load generator summary as the Go program prints it (the fields merged)."""
    d = {"concurrency": launched, "launched": launched, "ok_streams": ok, "errors": launched - ok,
         "error_kinds": kinds or {}, "events": 10 * ok, "tokens_received": 8 * ok, "rate": 0,
         "peak_open": peak, "start_unix": start, "wall_s": wall, "ramp_end_unix": start + 1.0,
         "loadgen_cpu_s": 0.25, "open_timeline": timeline, "tokens": 8, "url": "http://x"}
    d.update(kw)
    return d


class MergeTests(unittest.TestCase):
    """Merging K load generator shards into one summary, and K upstream shards' stats."""

    def test_percentiles_over_all_samples(self):
        """Percentiles are nearest-rank over the union of the shards' raw
        samples (not an average of the shards' percentiles): 1..100 split
        unevenly gives p50 = 51 (index round(0.5 x 99) = 50), p90 = 90, p99 = 99, max 100."""
        a = {"ttft_ms": [float(x) for x in range(1, 101, 2)], "gap_ms": [5.0], "total_ms": []}
        b = {"ttft_ms": [float(x) for x in range(2, 101, 2)], "gap_ms": [1.0, 3.0], "total_ms": []}
        m = run.merge_summaries([shard(10.0, 5.0, 50, 50, 50, []), shard(10.5, 5.0, 50, 50, 50, [])], [a, b])
        self.assertEqual(m["ttft_ms"], {"n": 100.0, "p50": 51.0, "p90": 90.0, "p99": 99.0, "max": 100.0})
        self.assertEqual(m["gap_ms"], {"n": 3.0, "p50": 3.0, "p90": 5.0, "p99": 5.0, "max": 5.0})
        self.assertEqual(m["total_ms"], {"n": 0.0})
        self.assertNotIn("cancel_ms", m)

    def test_counts_summed_and_wall_spans_all_shards(self):
        """Counts and error kinds are summed; the wall time runs from the
        first shard's start to the last shard's end; CPU is summed."""
        p = [shard(100.0, 12.0, 10000, 9990, 10000, [], {"read: EOF": 6, "status 502": 4}),
             shard(100.2, 12.5, 10000, 9997, 9999, [], {"read: EOF": 3})]
        m = run.merge_summaries(p, [{}, {}])
        self.assertEqual((m["launched"], m["ok_streams"], m["errors"], m["concurrency"]), (20000, 19987, 13, 20000))
        self.assertEqual((m["events"], m["tokens_received"]), (199870, 159896))
        self.assertEqual(m["error_kinds"], {"read: EOF": 9, "status 502": 4})
        self.assertEqual(m["wall_s"], 12.7)
        self.assertEqual(m["start_unix"], 100.0)
        self.assertEqual(m["loadgen_cpu_s"], 0.5)
        self.assertEqual(m["shards"], 2)

    def test_timelines_summed_by_time(self):
        """Open streams are summed at every tick of either shard, each shard
        counting its latest value (0 before its first tick); the peak open is
        the summed peak, the shards' summed peaks kept as an upper bound."""
        a = [[1.0, 10], [2.0, 30], [3.0, 5]]
        b = [[1.5, 20], [2.5, 25]]
        self.assertEqual(run.merge_timelines([a, b]),
                         [[1.0, 10], [1.5, 30], [2.0, 50], [2.5, 55], [3.0, 30]])
        m = run.merge_summaries([shard(0, 1, 30, 30, 31, a), shard(0, 1, 25, 25, 26, b)], [{}, {}])
        self.assertEqual(m["peak_open"], 55)
        self.assertEqual(m["peak_open_shards_sum"], 57)

    def test_cancels_merged(self):
        """S4's cancellation figures merge too: aborts and unseen summed,
        percentiles over both shards' latencies."""
        p = [shard(0, 1, 2, 2, 2, [], aborted=2, cancel_not_seen=0, cancel_ms={}),
             shard(0, 1, 2, 2, 2, [], aborted=2, cancel_not_seen=1, cancel_ms={})]
        m = run.merge_summaries(p, [{"cancel_ms": [0.5, 4.0]}, {"cancel_ms": [1.5]}])
        self.assertEqual((m["aborted"], m["cancel_not_seen"]), (4, 1))
        self.assertEqual(m["cancel_ms"], {"n": 3.0, "p50": 1.5, "p90": 4.0, "p99": 4.0, "max": 4.0})

    def test_rounding_matches_the_load_generator(self):
        """Merged percentiles are rounded to 0.001 ms half up, as the Go program does."""
        self.assertEqual(run.nearest_rank([1.23449, 2.0004999, 7.0005])["max"], 7.001)
        self.assertEqual(run.nearest_rank([1.23449])["p50"], 1.234)

    def test_upstream_stats_merged(self):
        """The upstream shards' counters are summed and the cancel gap
        percentiles taken over every shard's gaps (the upstream's nearest rank)."""
        a = {"started": 10, "completed": 8, "cancelled": 2, "active": 0, "slowed": 0, "failed": 0,
             "cancel_gaps_ms": [1.0, 9.0]}
        b = {"started": 7, "completed": 6, "cancelled": 1, "active": 1, "slowed": 0, "failed": 0,
             "cancel_gaps_ms": [2.0]}
        m = run.merge_upstream_stats([a, b])
        self.assertEqual((m["started"], m["completed"], m["cancelled"], m["active"]), (17, 14, 3, 1))
        self.assertEqual((m["cancel_gap_ms_p50"], m["cancel_gap_ms_p99"]), (2.0, 9.0))
        self.assertEqual(run.merge_upstream_stats([{"started": 1}])["cancel_gap_ms_p99"], 0)


class ShardPlanTests(unittest.TestCase):
    """How many processes the load generator and upstream need, and S5's cap per peer."""

    def test_shards_from_the_fd_limit(self):
        """A process holds at most the hard RLIMIT_NOFILE less 500 sockets: at
        20,000 that is 19,500, so 20,000 streams take two load generators and
        (with 10% slack for SO_REUSEPORT's spread) two upstreams; 9,750 take one."""
        budget = run.fd_budget(20000)
        self.assertEqual(budget, 19500)
        self.assertEqual(run.shard_count(20000, budget), 2)
        self.assertEqual(run.shard_count(19500, budget), 1)
        self.assertEqual(run.shard_count(0, budget), 1)
        self.assertEqual(run.upstream_shards(20000, budget), 2)
        self.assertEqual(run.upstream_shards(17727, budget), 1)
        self.assertEqual(run.upstream_shards(17728, budget), 2)
        self.assertEqual(run.upstream_shards(9750, budget), 1)
        self.assertEqual(run.shard_count(50000, 19500), 3)

    def test_split_is_exact(self):
        """Shares differ by at most one and add up to the whole."""
        self.assertEqual(run.split(20000, 2), [10000, 10000])
        self.assertEqual(run.split(10, 3), [4, 3, 3])
        self.assertEqual(sum(run.split(20001, 4)), 20001)

    def test_s5_cap_from_ephemeral_ports(self):
        """S5 is 20,000 streams unless the ephemeral port range (less 1,000)
        cannot carry them; the fd limit no longer caps it."""
        self.assertEqual(run.s5_cap(28232), 20000)
        self.assertEqual(run.s5_cap(16000), 15000)
        path = os.path.join(tempfile.mkdtemp(), "range")
        self.addCleanup(shutil.rmtree, os.path.dirname(path))
        with open(path, "w") as f:
            f.write("32768\t60999\n")
        self.assertEqual(run.ephemeral_ports(path), 28232)

    def test_peer_caps(self):
        """direct holds no sockets (no cap); one proxy process holds two per
        stream (9,750 at 19,500); llmgate-w4's workers hold 26,000 with a
        worker allowed 1.5x its share, llmgate-w2's 13,000."""
        self.assertIsNone(run.peer_stream_cap("direct", 19500))
        for peer in ("goproxy", "llmgate", "llmgate-bare", "llmgate-w1"):
            self.assertEqual(run.peer_stream_cap(peer, 19500), 9750, peer)
        self.assertEqual(run.peer_stream_cap("llmgate-w2", 19500), 13000)
        self.assertEqual(run.peer_stream_cap("llmgate-w4", 19500), 26000)

    def test_s5_runs_at_the_peer_cap(self):
        """A peer that cannot hold S5's streams runs S5 at its cap, with the
        1,000/s ramp and 10 s beyond it, and says so; direct and llmgate-w4
        run the full 20,000; other scenarios are never changed."""
        sc = run.s5_shape(dict(desc="S5", delay=1000, stop_on_error=True), 20000)
        self.assertEqual((sc["c"], sc["ramp"], sc["tokens"]), (20000, 20.0, 30))
        g = run.scenario_for_peer(sc, "goproxy", 19500)
        self.assertEqual((g["c"], g["ramp"], g["tokens"]), (9750, 9.75, 19))
        self.assertIn("ran at 9750 of 20000 streams", g["capped"])
        self.assertIs(run.scenario_for_peer(sc, "direct", 19500), sc)
        self.assertIs(run.scenario_for_peer(sc, "llmgate-w4", 19500), sc)
        s3 = dict(c=50000, tokens=50, delay=200, ramp=5.0)
        self.assertIs(run.scenario_for_peer(s3, "goproxy", 19500), s3)

    def test_s5_rate_and_token_delay(self):
        """--s5-rate and --s5-delay-ms: 20,000 streams at 500/s ramp over 40 s;
        a token every 5 s for 50 s (10 tokens) outlives the ramp by 10 s; a
        capped peer keeps the rate (9,750 over 19.5 s, 5 tokens); the defaults
        are S5 as before (1,000/s, one token a second)."""
        sc = run.scenarios(1.0, False, 500, 5000)["S5"]
        self.assertEqual((sc["ramp"], sc["tokens"], sc["delay"]), (40.0, 10, 5000))
        self.assertEqual(sc["desc"], "ramp at 500/s until failure or %d streams (max concurrent streams)" % run.s5_cap())
        g = run.scenario_for_peer(sc, "goproxy", 19500)
        self.assertEqual((g["c"], g["ramp"], g["tokens"]), (9750, 19.5, 5))
        d = run.scenarios(1.0, False)["S5"]
        self.assertEqual(d["desc"], "ramp at 1,000/s until failure or %d streams (max concurrent streams)" % run.s5_cap())
        self.assertEqual((d["delay"], d["ramp"] * 1000, d["tokens"]), (1000, d["c"], int(d["c"] / 1000) + 10))

    def test_loadgen_argvs_split_streams_not_ramp(self):
        """20,000 streams at a 19,500 budget: two load generators of 10,000,
        each over the whole 20 s ramp (so 1,000/s together), with their own
        shard number and samples file; under the budget one load generator
        with exactly the single-process command line."""
        sc = run.scenarios(1.0, False)["S5"]
        sc = run.s5_shape(dict(sc), 20000)
        argvs, limit = run.loadgen_shard_argvs("http://x", sc, 9, False, 19500, "/tmp/d", "http://a,http://b")
        self.assertEqual(len(argvs), 2)
        for i, a in enumerate(argvs):
            self.assertEqual(a[a.index("-c") + 1], "10000")
            self.assertEqual(a[a.index("-ramp") + 1], "20.000s")
            self.assertEqual(a[a.index("-shard") + 1], str(i))
            self.assertEqual(a[a.index("-samples") + 1], "/tmp/d/samples-%d.json" % i)
        one, limit1 = run.loadgen_shard_argvs("http://x", sc, 9, False, 20000, "/tmp/d")
        self.assertEqual(one, [run.loadgen_argv("http://x", sc, 9, False)[0]])
        self.assertEqual(limit, limit1)

    def test_workers_peers(self):
        """llmgate-wN is a known peer for any N and runs --workers N."""
        self.assertTrue(run.known_peer("llmgate-w4"))
        self.assertTrue(run.known_peer("llmgate-w12"))
        self.assertFalse(run.known_peer("llmgate-w0"))
        self.assertEqual(run.llmgate_workers_args("llmgate-w4", True), ["--workers", "4"])


@unittest.skipUnless(os.path.exists(os.path.join(run.BIN, "loadgen")) and
                     os.path.exists(os.path.join(run.BIN, "upstream")), "bench/bin not built")
class ShardedUpstreamTests(unittest.TestCase):
    """The Go upstream on several processes sharing one port (SO_REUSEPORT), over real sockets."""

    def start_upstream(self, shards):
        workdir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, workdir)
        up = run.Upstream(workdir, shards=shards).start()
        self.addCleanup(up.stop)
        return up, workdir

    def loadgen(self, up, *args):
        url = "http://127.0.0.1:%d/v1/chat/completions" % up.port
        out = subprocess.run([os.path.join(run.BIN, "loadgen"), "-url", url, "-timeline", "0"] + list(args),
                             capture_output=True, timeout=60, check=True).stdout
        return json.loads(out)

    def test_one_port_many_processes(self):
        """Two upstream processes on one port: 60 connections reach both
        (each shard's own admin port counts its share), and the merged /stats
        counts all 60."""
        up, _ = self.start_upstream(2)
        self.assertEqual(len(set(up.pids)), 2)
        r = self.loadgen(up, "-c", "60", "-tokens", "1", "-delay-ms", "1", "-ramp", "0.3s")
        self.assertEqual(r["ok_streams"], 60)
        each = [run.http_json(u) for u in up._urls("/stats")]
        self.assertTrue(all(s["started"] > 0 for s in each), each)
        self.assertEqual(sum(s["started"] for s in each), 60)
        self.assertEqual(up.stats()["started"], 60)
        self.assertEqual(up.stats()["completed"], 60)
        up.reset()
        self.assertEqual(up.stats()["started"], 0)

    def test_cancels_from_every_shard(self):
        """Aborted streams are matched to the detection times of whichever
        shard served them: with -cancels listing both shards every abort is seen."""
        up, _ = self.start_upstream(2)
        r = self.loadgen(up, "-c", "20", "-tokens", "20", "-delay-ms", "20", "-ramp", "0.2s",
                         "-abort-after", "2", "-cancels", up.cancels_urls())
        self.assertEqual(r["aborted"], 20)
        self.assertEqual(r["cancel_not_seen"], 0)
        self.assertEqual(up.stats()["cancelled"], 20)

    def test_single_upstream_is_unchanged(self):
        """One shard is one process without -reuseport, its stats on its own port."""
        up, _ = self.start_upstream(1)
        self.assertEqual(up.admin_ports, [up.port])
        with open("/proc/%d/cmdline" % up.pids[0], "rb") as f:
            self.assertNotIn(b"-reuseport", f.read())

    def test_sharded_loadgen_merges(self):
        """Two load generator shards through run_shards: the merged summary
        counts every stream once (distinct ids: the upstream saw 30 different
        streams), and its percentiles equal those of the shards' raw samples."""
        up, workdir = self.start_upstream(2)
        sc = dict(c=30, tokens=2, delay=5, ramp=0.2)
        url = "http://127.0.0.1:%d/v1/chat/completions" % up.port
        argvs, timeout = run.loadgen_shard_argvs(url, sc, up.port, False, 16, workdir)
        self.assertEqual(len(argvs), 2)
        sampler = run.Sampler({"upstream": up.pids})
        sampler.start()
        try:
            m = run.run_shards(argvs, timeout, sampler)
        finally:
            sampler.finish()
        self.assertEqual((m["launched"], m["ok_streams"], m["errors"], m["shards"]), (30, 30, 0, 2))
        self.assertEqual(m["ttft_ms"]["n"], 30.0)
        self.assertEqual(m["gap_ms"]["n"], 30.0)
        self.assertEqual(up.stats()["completed"], 30)

    def test_samples_reproduce_the_summary(self):
        """-samples writes the raw samples from which the Go program's own
        percentiles follow: the runner's merge of one shard equals its summary."""
        up, workdir = self.start_upstream(1)
        path = os.path.join(workdir, "s.json")
        r = self.loadgen(up, "-c", "25", "-tokens", "3", "-delay-ms", "3", "-ramp", "0.1s", "-samples", path)
        with open(path) as f:
            raw = json.load(f)
        for key in ("ttft_ms", "gap_ms", "total_ms"):
            self.assertEqual(run.nearest_rank(raw[key]), r[key], key)


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
