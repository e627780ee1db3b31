# -*- test-case-name: tests.accounting.test_prices -*-
"""
Tests for L{llmgate.accounting.prices}.
"""

from twisted.trial.unittest import SynchronousTestCase

from llmgate.accounting.prices import DEFAULT_PRICES, Price, PriceTable
from llmgate.accounting.usage import Usage, make_accumulator

from tests.dialects.test_sse import fixture


class LookupTests(SynchronousTestCase):
    def setUp(self):
        self.table = PriceTable.from_config({})

    def test_defaultsComplete(self):
        """
        The common models all have a dated, sourced default price.
        """
        for model in (
            "gpt-4o",
            "gpt-4o-mini",
            "gpt-4.1",
            "gpt-4.1-mini",
            "o3",
            "o4-mini",
            "gpt-5",
            "gpt-5-mini",
            "text-embedding-3-small",
            "text-embedding-3-large",
            "claude-sonnet-4",
            "claude-opus-4",
            "claude-3-5-haiku",
            "claude-haiku-4-5",
        ):
            price = self.table.lookup(model)
            self.assertIsNotNone(price, model)
            self.assertTrue(price.as_of and price.source.startswith("https://"), model)
        for model, price in DEFAULT_PRICES.items():
            if model.startswith("claude") and model != "claude-3-haiku":  # listed at $0.30, not 1.25x
                self.assertAlmostEqual(price.cache_write, price.input * 1.25, msg=model)

    def test_exactThenSnapshotPrefix(self):
        """
        Dated snapshots fall back to their family; the longest key wins; an
        exact snapshot entry beats its family.
        """
        t = self.table
        self.assertIs(t.lookup("gpt-4o-2024-08-06"), DEFAULT_PRICES["gpt-4o"])
        self.assertIs(t.lookup("gpt-4o-mini-2024-07-18"), DEFAULT_PRICES["gpt-4o-mini"])
        self.assertIs(t.lookup("claude-sonnet-4-5-20250929"), DEFAULT_PRICES["claude-sonnet-4-5"])
        self.assertIs(t.lookup("claude-sonnet-4-20250514"), DEFAULT_PRICES["claude-sonnet-4"])
        self.assertIs(t.lookup("claude-3-5-haiku-latest"), DEFAULT_PRICES["claude-3-5-haiku"])
        self.assertIs(t.lookup("gpt-4-0613"), DEFAULT_PRICES["gpt-4"])
        self.assertEqual(t.lookup("gpt-4o-2024-05-13").input, 5.0)

    def test_noLooseprefix(self):
        """
        A different model that merely starts with a known name is unpriced,
        not given the wrong price.
        """
        table = PriceTable({"gpt-4.1": DEFAULT_PRICES["gpt-4.1"]})
        self.assertIsNone(table.lookup("gpt-4.1-nano"))
        self.assertIsNone(table.lookup("gpt-4.1-nano-2025-04-14"))
        self.assertIsNone(table.lookup("gpt-4.1x"))
        self.assertIsNone(self.table.lookup("llama-3-70b"))


class CostTests(SynchronousTestCase):
    def setUp(self):
        self.table = PriceTable({"m": Price(input=2.0, output=8.0, cached_input=0.5, cache_write=2.5)})

    def test_buckets(self):
        """
        Each input bucket is charged once at its own rate; reasoning is
        inside output and not charged again.
        """
        usage = Usage(
            input_tokens=1_000_000,
            output_tokens=1_000_000,
            cached_input_tokens=400_000,
            cache_creation_tokens=100_000,
            reasoning_tokens=900_000,
        )
        self.assertAlmostEqual(self.table.cost("m", usage), 0.5 * 2.0 + 0.4 * 0.5 + 0.1 * 2.5 + 8.0)

    def test_unknownModelIsNone(self):
        """
        No price means None, never 0; so does usage without counts.
        """
        self.assertIsNone(self.table.cost("other", Usage(input_tokens=1, output_tokens=1)))
        self.assertIsNone(self.table.cost("m", Usage()))
        self.assertIsNone(self.table.cost("m", None))
        self.assertEqual(self.table.cost("m", Usage(input_tokens=0, output_tokens=0)), 0.0)

    def test_missingCacheRatesUseInput(self):
        """
        Without cache prices, cached and written tokens cost the input rate.
        """
        table = PriceTable({"m": Price(input=1.0, output=0.0)})
        usage = Usage(input_tokens=1_000_000, output_tokens=0, cached_input_tokens=300_000, cache_creation_tokens=200_000)
        self.assertAlmostEqual(table.cost("m", usage), 1.0)

    def test_inconsistentCountsNotNegative(self):
        """
        If cache counts exceed the total, uncached input is 0, not negative.
        """
        usage = Usage(input_tokens=10, output_tokens=0, cached_input_tokens=20)
        self.assertAlmostEqual(self.table.cost("m", usage), 20 * 0.5 / 1e6)

    def test_fixtureUsages(self):
        """
        Costs of the fixtures' usage with the shipped prices.
        """
        table = PriceTable.from_config({})
        acc = make_accumulator("openai.chat")
        acc.on_body(fixture("openai_chat.json"))  # o4-mini: 152 uncached, 1280 cached, 312 out
        self.assertAlmostEqual(table.cost("o4-mini-2025-04-16", acc.usage), (152 * 1.10 + 1280 * 0.275 + 312 * 4.40) / 1e6)
        acc = make_accumulator("anthropic.messages")
        acc.on_body(fixture("anthropic_messages.json"))  # 214 uncached, 3072 read, 96 out
        self.assertAlmostEqual(
            table.cost("claude-sonnet-4-5-20250929", acc.usage), (214 * 3.0 + 3072 * 0.30 + 96 * 15.0) / 1e6
        )
        # message_start 37 uncached + 1536 cache writes, 48 out
        from tests.accounting.test_usage import run_stream

        acc = run_stream("anthropic.messages", fixture("anthropic_messages_stream.sse"), None)
        self.assertAlmostEqual(
            table.cost("claude-sonnet-4-5", acc.usage), (37 * 3.0 + 1536 * 3.75 + 48 * 15.0) / 1e6
        )
        acc = make_accumulator("openai.embeddings")
        acc.on_body(fixture("openai_embeddings.json"))
        self.assertAlmostEqual(table.cost("text-embedding-3-small", acc.usage), 11 * 0.02 / 1e6)


class ConfigTests(SynchronousTestCase):
    def test_overrideAndAdd(self):
        """
        Config entries replace a default wholesale and add new models;
        defaults=False drops the shipped table.
        """
        table = PriceTable.from_config(
            {"gpt-4o": {"input": 1, "output": 2}, "my-model": {"input": 0.5, "output": 0.5, "cached_input": 0.1}}
        )
        self.assertEqual(table.lookup("gpt-4o"), Price(1.0, 2.0, None, None, "", "config"))
        self.assertEqual(table.lookup("my-model-2025-01-01").cached_input, 0.1)
        self.assertIsNotNone(table.lookup("gpt-5"))
        self.assertIsNone(PriceTable.from_config({"x": {"input": 1, "output": 1}}, defaults=False).lookup("gpt-5"))

    def test_validation(self):
        """
        Bad entries raise ValueError naming the model and key.
        """
        cases = [
            ({"m": {"input": 1, "output": 1, "cachd_input": 1}}, "cachd_input"),
            ({"m": {"input": 1}}, "output"),
            ({"m": {"input": -1, "output": 1}}, "input"),
            ({"m": {"input": "1", "output": 1}}, "input"),
            ({"m": {"input": True, "output": 1}}, "input"),
            ({"m": {"input": float("nan"), "output": 1}}, "input"),
            ({"m": {"input": 1, "output": 1, "as_of": 5}}, "as_of"),
            ({"m": 3}, "'m'"),
            ({"": {"input": 1, "output": 1}}, "model name"),
        ]
        for mapping, needle in cases:
            exc = self.assertRaises(ValueError, PriceTable.from_config, mapping)
            self.assertIn(needle, str(exc), mapping)
        self.assertRaises(ValueError, PriceTable.from_config, [("m", {})])
