# -*- test-case-name: tests.accounting.test_prices -*-
"""
Tests for L{llmgate.accounting.prices} and the generator of its table,
C{tools/update_prices.py}.

Expected prices are written out by hand from the providers' list prices as
LiteLLM records them, never computed by the code under test.
"""

import contextlib
import importlib.util
import io
import json
import os
import re

from twisted.trial.unittest import SynchronousTestCase

from llmgate.accounting.prices import (
    ALIASES,
    DEFAULT_PRICES,
    PRICE_SOURCES,
    PRICES_FILE,
    Price,
    PriceTable,
    Tier,
    load_price_file,
)
from llmgate.accounting.usage import Usage, make_accumulator

from tests.dialects.test_sse import fixture

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _generator():
    """tools/update_prices.py as a module (tools/ is not a package)."""
    path = os.path.join(_ROOT, "tools", "update_prices.py")
    spec = importlib.util.spec_from_file_location("update_prices", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class ShippedTableTests(SynchronousTestCase):
    """The generated table that ships with the gateway."""

    def setUp(self):
        self.table = PriceTable.from_config({})

    def test_sourceNamedAndDated(self):
        """
        The table names where it came from (LiteLLM's table, which release,
        its date and checksum), and every entry carries its source's label
        and date.
        """
        self.assertTrue(PRICE_SOURCES)
        dates = set()
        for src in PRICE_SOURCES:
            self.assertEqual(src["repo"], "BerriAI/litellm")
            self.assertEqual(src["path"], "model_prices_and_context_window.json")
            self.assertRegex(src["date"], r"^\d{4}-\d{2}-\d{2}$")
            self.assertRegex(src["sha256"], r"^[0-9a-f]{64}$")
            self.assertIn(src["release"], src["label"])
            dates.add(src["date"])
        with open(PRICES_FILE, encoding="utf-8") as f:
            doc = json.load(f)
        self.assertRegex(doc["generated"], r"^\d{4}-\d{2}-\d{2}$")
        self.assertIn("tools/update_prices.py", doc["comment"])
        for model, price in DEFAULT_PRICES.items():
            self.assertIn(price.as_of, dates, model)
            self.assertIn("BerriAI/litellm", price.source, model)

    def test_everyEntryComplete(self):
        """
        Every entry has input and output; every Claude entry has its cache
        read and write prices (Anthropic lists both for all models); every
        tier has a threshold and at least one rate; the table stays a
        reasonable size.
        """
        with open(PRICES_FILE, encoding="utf-8") as f:
            models = json.load(f)["models"]
        self.assertGreater(len(models), 100)
        self.assertLess(len(models), 500)
        for model, price in DEFAULT_PRICES.items():
            self.assertIsInstance(price.input, float, model)
            self.assertIsInstance(price.output, float, model)
            self.assertGreaterEqual(price.input, 0, model)
            if models[model]["provider"] == "anthropic":
                self.assertIsNotNone(price.cached_input, model)
                self.assertIsNotNone(price.cache_write, model)
            for tier in price.tiers:
                self.assertGreater(tier.above, 0, model)
                self.assertTrue(any(getattr(tier, k) is not None for k in ("input", "output")), model)

    def test_knownPrices(self):
        """
        Spot checks against the list prices (USD per 1M tokens), including
        the buckets and tiers the source has: input, output, cache read,
        5-minute and 1-hour cache write, and Sonnet 4's long-context tier.
        """
        t = self.table
        cases = {
            "gpt-4o": (2.5, 10.0, 1.25, None),
            "gpt-4o-mini": (0.15, 0.6, 0.075, None),
            "o4-mini": (1.1, 4.4, 0.275, None),
            "gpt-4.1": (2.0, 8.0, 0.5, None),
            "gpt-5": (1.25, 10.0, 0.125, None),
            "text-embedding-3-small": (0.02, 0.0, None, None),
            "text-embedding-3-large": (0.13, 0.0, None, None),
            "claude-sonnet-4-5": (3.0, 15.0, 0.3, 3.75),
            "claude-haiku-4-5": (1.0, 5.0, 0.1, 1.25),
            "claude-opus-4-5": (5.0, 25.0, 0.5, 6.25),
            "claude-sonnet-4-20250514": (3.0, 15.0, 0.3, 3.75),
            "claude-opus-4-1-20250805": (15.0, 75.0, 1.5, 18.75),
            "claude-3-haiku-20240307": (0.25, 1.25, 0.03, 0.3),
            "deepseek-chat": (0.28, 0.42, 0.028, 0.0),
        }
        for model, (inp, out, cached, write) in cases.items():
            p = t.lookup(model)
            self.assertIsNotNone(p, model)
            self.assertEqual((p.input, p.output, p.cached_input, p.cache_write), (inp, out, cached, write), model)
        self.assertEqual(t.lookup("claude-sonnet-4-5").cache_write_1h, 6.0)
        self.assertEqual(t.lookup("claude-opus-4-5").cache_write_1h, 10.0)
        self.assertEqual(
            t.lookup("claude-sonnet-4-20250514").tiers,
            (Tier(above=200_000, input=6.0, output=22.5, cached_input=0.6, cache_write=7.5),),
        )
        self.assertEqual(
            t.lookup("gpt-5.4").tiers, (Tier(above=272_000, input=5.0, output=22.5, cached_input=0.5),)
        )
        # The first gpt-4o snapshot kept its launch price.
        self.assertEqual((t.lookup("gpt-4o-2024-05-13").input, t.lookup("gpt-4o-2024-05-13").output), (5.0, 15.0))

    def test_aliasesAndSnapshotsPriced(self):
        """
        The providers' documented aliases and dated snapshots are priced
        as the model they name: claude-sonnet-4-0 is Sonnet 4, and
        claude-3-5-haiku-latest is priced as its snapshot (the source's
        own, different entry for the alias was a slip and is not shipped).
        """
        t = self.table
        cases = {
            "claude-sonnet-4-0": (3.0, 15.0),
            "claude-opus-4-0": (15.0, 75.0),
            "claude-opus-4-1": (15.0, 75.0),
            "claude-3-5-sonnet-latest": (3.0, 15.0),
            "claude-3-7-sonnet-latest": (3.0, 15.0),
            "claude-3-5-haiku-latest": (0.8, 4.0),
            "claude-sonnet-4-5-20250929": (3.0, 15.0),
            "claude-haiku-4-5-20251001": (1.0, 5.0),
            "gpt-4o-2024-08-06": (2.5, 10.0),
            "gpt-4o-mini-2024-07-18": (0.15, 0.6),
            "o4-mini-2025-04-16": (1.1, 4.4),
            "gpt-4-0613": (30.0, 60.0),
            "ft:gpt-4o-mini-2024-07-18:acme::AbC123": (0.3, 1.2),
        }
        for model, (inp, out) in cases.items():
            p = t.lookup(model)
            self.assertIsNotNone(p, model)
            self.assertEqual((p.input, p.output), (inp, out), model)
        self.assertNotIn("claude-3-5-haiku-latest", DEFAULT_PRICES)


class LookupTests(SynchronousTestCase):
    """Name resolution on small hand-made tables."""

    A = Price(1.0, 2.0)
    B = Price(3.0, 4.0)

    def test_aliasFindsSnapshotAndBack(self):
        """
        A documented alias without an entry finds its snapshot's price, and
        a snapshot without an entry finds its alias's.
        """
        self.assertEqual(ALIASES["claude-sonnet-4-0"], "claude-sonnet-4-20250514")
        table = PriceTable({"claude-sonnet-4-20250514": self.A, "claude-opus-4-1": self.B})
        self.assertIs(table.lookup("claude-sonnet-4-0"), self.A)
        self.assertIs(table.lookup("claude-opus-4-1-20250805"), self.B)
        self.assertIsNone(table.lookup("claude-opus-4-0"))

    def test_explicitEntryWins(self):
        """
        An entry of its own beats any derived price, and a config override
        of a snapshot reaches its alias.
        """
        table = PriceTable({"claude-sonnet-4-0": self.A, "claude-sonnet-4-20250514": self.B})
        self.assertIs(table.lookup("claude-sonnet-4-0"), self.A)
        self.assertIs(table.lookup("claude-sonnet-4-20250514"), self.B)
        table = PriceTable({"gpt-4o": self.A, "gpt-4o-2024-05-13": self.B})
        self.assertIs(table.lookup("gpt-4o-2024-05-13"), self.B)
        self.assertIs(table.lookup("gpt-4o-2024-11-20"), self.A)
        table = PriceTable.from_config({"claude-sonnet-4-20250514": {"input": 9, "output": 9}})
        self.assertEqual(table.lookup("claude-sonnet-4-0").input, 9.0)

    def test_snapshotFallsBackToFamily(self):
        """
        Dated, numbered and -latest snapshots fall back to their family;
        the most specific family wins.
        """
        table = PriceTable({"gpt-4o": self.A, "gpt-4o-mini": self.B, "gpt-4": self.A, "m": self.B})
        self.assertIs(table.lookup("gpt-4o-2024-08-06"), self.A)
        self.assertIs(table.lookup("gpt-4o-mini-2024-07-18"), self.B)
        self.assertIs(table.lookup("gpt-4-0613"), self.A)
        self.assertIs(table.lookup("m-latest"), self.B)
        self.assertIs(table.lookup("m-20250101"), self.B)

    def test_noLoosePrefix(self):
        """
        A different model that merely starts with a known name is unpriced,
        not given the wrong price.
        """
        table = PriceTable({"gpt-4.1": self.A})
        self.assertIsNone(table.lookup("gpt-4.1-nano"))
        self.assertIsNone(table.lookup("gpt-4.1-nano-2025-04-14"))
        self.assertIsNone(table.lookup("gpt-4.1x"))
        self.assertIsNone(table.lookup("gpt-4.1-2025-04-14-extra"))
        self.assertIsNone(PriceTable.from_config({}).lookup("llama-3-70b"))

    def test_fineTune(self):
        """
        An OpenAI fine-tune id is priced at its base's fine-tuning rates,
        never at the base model's (cheaper) rates.
        """
        table = PriceTable({"ft:gpt-4o-mini-2024-07-18": self.B, "gpt-4o-mini-2024-07-18": self.A, "gpt-4o": self.A})
        self.assertIs(table.lookup("ft:gpt-4o-mini-2024-07-18:acme:my-bot:AbC123"), self.B)
        self.assertIs(table.lookup("ft:gpt-4o-mini-2024-07-18:acme::AbC123"), self.B)
        self.assertIsNone(table.lookup("ft:gpt-4o:acme::x"))
        self.assertIsNone(table.lookup("ft:"))
        self.assertIsNone(table.lookup("ft::::"))

    def test_derivedCached(self):
        """
        A derived name (hit or miss) is worked out once, then answered from
        a dict.
        """
        table = PriceTable({"gpt-4o": self.A})
        calls = []
        real = table._derive
        table._derive = lambda m: calls.append(m) or real(m)
        for _ in range(3):
            self.assertIs(table.lookup("gpt-4o-2024-08-06"), self.A)
            self.assertIsNone(table.lookup("junk"))
            self.assertIs(table.lookup("gpt-4o"), self.A)
        self.assertEqual(calls, ["gpt-4o-2024-08-06", "junk"])

    def test_cacheBounded(self):
        """
        Junk model names cannot grow the cache past its bound, and lookups
        stay right after it has been refilled.
        """
        table = PriceTable({"gpt-4o": self.A}, cache_size=8)
        for i in range(1000):
            self.assertIsNone(table.lookup(f"junk-{i}"))
            self.assertLessEqual(len(table._derived), 8)
        self.assertIs(table.lookup("gpt-4o-2024-08-06"), self.A)
        self.assertIs(PriceTable.from_config({}).lookup("gpt-4o-2024-08-06"), DEFAULT_PRICES["gpt-4o-2024-08-06"])


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

    def test_cacheWrite1h(self):
        """
        The 1-hour part of the cache writes is charged at cache_write_1h,
        the rest of the writes at cache_write; without a 1-hour price, at
        2x input (Anthropic's 1-hour write multiplier), not at the
        5-minute rate; never more 1-hour tokens than writes.
        """
        table = PriceTable(
            {
                "p": Price(input=3.0, output=15.0, cached_input=0.3, cache_write=3.75, cache_write_1h=6.0),
                "n": Price(input=15.0, output=75.0, cached_input=1.5, cache_write=18.75),
            }
        )
        usage = Usage(
            input_tokens=1_000_000,
            output_tokens=100_000,
            cached_input_tokens=200_000,
            cache_creation_tokens=500_000,
            cache_creation_1h_tokens=300_000,
        )
        # p: 0.3M*3 + 0.2M*0.3 + 0.2M*3.75 + 0.3M*6 + 0.1M*15
        #  = 0.9 + 0.06 + 0.75 + 1.8 + 1.5 = 5.01
        self.assertAlmostEqual(table.cost("p", usage), 5.01)
        # n: 0.3M*15 + 0.2M*1.5 + 0.2M*18.75 + 0.3M*30 + 0.1M*75
        #  = 4.5 + 0.3 + 3.75 + 9 + 7.5 = 25.05
        self.assertAlmostEqual(table.cost("n", usage), 25.05)
        over = Usage(input_tokens=1_000, output_tokens=0, cache_creation_tokens=100, cache_creation_1h_tokens=400)
        # 900*3 + 100*6 = 3300 per 1M
        self.assertAlmostEqual(table.cost("p", over), 3300 / 1e6)

    def test_cacheWrite1hTier(self):
        """
        Above a long-context tier, 1-hour writes cost the tier's
        cache_write_1h when it names one, else the base price's.
        """
        table = PriceTable(
            {
                "t": Price(
                    input=3.0, output=15.0, cache_write=3.75, cache_write_1h=6.0,
                    tiers=(Tier(above=200_000, input=6.0, cache_write=7.5, cache_write_1h=12.0),),
                ),
                "b": Price(input=3.0, output=15.0, cache_write=3.75, cache_write_1h=6.0, tiers=(Tier(above=200_000, input=6.0),)),
            }
        )
        usage = Usage(input_tokens=300_000, output_tokens=0, cache_creation_tokens=100_000, cache_creation_1h_tokens=100_000)
        # t: 0.2M*6 + 0.1M*12 = 2.4; b: 0.2M*6 + 0.1M*6 = 1.8
        self.assertAlmostEqual(table.cost("t", usage), 2.4)
        self.assertAlmostEqual(table.cost("b", usage), 1.8)

    def test_inconsistentCountsNotNegative(self):
        """
        If cache counts exceed the total, uncached input is 0, not negative.
        """
        usage = Usage(input_tokens=10, output_tokens=0, cached_input_tokens=20)
        self.assertAlmostEqual(self.table.cost("m", usage), 20 * 0.5 / 1e6)

    def test_longContextTier(self):
        """
        Above the tier's threshold of total input tokens (cache reads and
        writes included) the whole request is charged at the tier's rates;
        at the threshold itself, at the base rates.
        """
        tier = Tier(above=200_000, input=6.0, output=22.5, cached_input=0.6, cache_write=7.5)
        table = PriceTable({"s": Price(3.0, 15.0, 0.3, 3.75, tiers=(tier,))})
        at = Usage(input_tokens=200_000, output_tokens=1_000, cached_input_tokens=100_000, cache_creation_tokens=50_000)
        self.assertAlmostEqual(table.cost("s", at), (50_000 * 3.0 + 100_000 * 0.3 + 50_000 * 3.75 + 1_000 * 15.0) / 1e6)
        over = Usage(input_tokens=200_001, output_tokens=1_000, cached_input_tokens=100_000, cache_creation_tokens=50_000)
        self.assertAlmostEqual(
            table.cost("s", over), (50_001 * 6.0 + 100_000 * 0.6 + 50_000 * 7.5 + 1_000 * 22.5) / 1e6
        )

    def test_tierKeepsRatesItDoesNotName(self):
        """
        A tier that names only some rates leaves the others at the base
        price; of several tiers the highest one exceeded applies.
        """
        tiers = (Tier(above=100, input=10.0), Tier(above=1_000, input=20.0, output=40.0))
        table = PriceTable({"t": Price(1.0, 2.0, 0.5, tiers=tiers)})
        u = Usage(input_tokens=500, output_tokens=10, cached_input_tokens=100)
        self.assertAlmostEqual(table.cost("t", u), (400 * 10.0 + 100 * 0.5 + 10 * 2.0) / 1e6)
        u = Usage(input_tokens=5_000, output_tokens=10)
        self.assertAlmostEqual(table.cost("t", u), (5_000 * 20.0 + 10 * 40.0) / 1e6)

    def test_shippedLongContext(self):
        """
        Sonnet 4 through its alias costs the long-context rates above 200k
        input tokens.
        """
        table = PriceTable.from_config({})
        u = Usage(input_tokens=250_000, output_tokens=2_000)
        self.assertAlmostEqual(table.cost("claude-sonnet-4-0", u), (250_000 * 6.0 + 2_000 * 22.5) / 1e6)
        u = Usage(input_tokens=150_000, output_tokens=2_000)
        self.assertAlmostEqual(table.cost("claude-sonnet-4-0", u), (150_000 * 3.0 + 2_000 * 15.0) / 1e6)

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

    def test_optionalNewFields(self):
        """
        Config may give a 1-hour cache write price and long-context tiers;
        tiers come out sorted by threshold.
        """
        table = PriceTable.from_config(
            {
                "m": {
                    "input": 1,
                    "output": 2,
                    "cache_write_1h": 2,
                    "tiers": [{"above": 300_000, "input": 4}, {"above": 100_000, "input": 3, "output": 5}],
                }
            }
        )
        p = table.lookup("m")
        self.assertEqual(p.cache_write_1h, 2.0)
        self.assertEqual(p.tiers, (Tier(100_000, input=3.0, output=5.0), Tier(300_000, input=4.0)))

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
            ({"m": {"input": 1, "output": 1, "cache_write_1h": -1}}, "cache_write_1h"),
            ({"m": 3}, "'m'"),
            ({"": {"input": 1, "output": 1}}, "model name"),
            ({"m": {"input": 1, "output": 1, "tiers": {"above": 1}}}, "tiers"),
            ({"m": {"input": 1, "output": 1, "tiers": [3]}}, "tiers[0]"),
            ({"m": {"input": 1, "output": 1, "tiers": [{"input": 2}]}}, "tiers[0].above"),
            ({"m": {"input": 1, "output": 1, "tiers": [{"above": 0, "input": 2}]}}, "tiers[0].above"),
            ({"m": {"input": 1, "output": 1, "tiers": [{"above": 1.5, "input": 2}]}}, "tiers[0].above"),
            ({"m": {"input": 1, "output": 1, "tiers": [{"above": 10}]}}, "names no rate"),
            ({"m": {"input": 1, "output": 1, "tiers": [{"above": 10, "inptu": 1}]}}, "tiers[0].inptu"),
            ({"m": {"input": 1, "output": 1, "tiers": [{"above": 10, "input": -1}]}}, "tiers[0].input"),
            ({"m": {"input": 1, "output": 1, "tiers": [{"above": 10, "input": 2}, {"above": 10, "input": 3}]}}, "same above"),
        ]
        for mapping, needle in cases:
            exc = self.assertRaises(ValueError, PriceTable.from_config, mapping)
            self.assertIn(needle, str(exc), mapping)
            self.assertIn("'m'" if "m" in mapping else "model name", str(exc), mapping)
        self.assertRaises(ValueError, PriceTable.from_config, [("m", {})])


# A LiteLLM-shaped source, as model_prices_and_context_window.json writes it.
_NEW = {
    "sample_spec": {"input_cost_per_token": 0.0, "litellm_provider": "one of ..."},
    "gpt-x": {
        "litellm_provider": "openai",
        "mode": "chat",
        "input_cost_per_token": 2.5e-06,
        "output_cost_per_token": 1.5e-05,
        "cache_read_input_token_cost": 2.5e-07,
        "input_cost_per_token_above_272k_tokens": 5e-06,
        "output_cost_per_token_above_272k_tokens": 2.25e-05,
        "input_cost_per_token_above_272k_tokens_priority": 1e-05,
        "input_cost_per_token_batches": 1.25e-06,
    },
    "claude-sonnet-4-5": {
        "litellm_provider": "anthropic",
        "mode": "chat",
        "input_cost_per_token": 3e-06,
        "output_cost_per_token": 1.5e-05,
        "cache_read_input_token_cost": 3e-07,
        "cache_creation_input_token_cost": 3.75e-06,
        "cache_creation_input_token_cost_above_1hr": 6e-06,
        "input_cost_per_token_above_200k_tokens": 6e-06,
        "cache_creation_input_token_cost_above_1hr_above_200k_tokens": 1.2e-05,
    },
    "claude-sonnet-4-5-20250929": {
        "litellm_provider": "anthropic",
        "mode": "chat",
        "input_cost_per_token": 3e-06,
        "output_cost_per_token": 1.5e-05,
    },
    "text-embedding-x": {"litellm_provider": "openai", "mode": "embedding", "input_cost_per_token": 2e-08},
    "dall-e-x": {"litellm_provider": "openai", "mode": "image_generation", "input_cost_per_token": 1e-06},
    "openai/container": {"litellm_provider": "openai", "mode": "chat", "input_cost_per_token": 1e-06,
                         "output_cost_per_token": 1e-06},
    "per-second": {"litellm_provider": "openai", "mode": "chat", "input_cost_per_second": 1e-04},
    "deepseek/deepseek-chat": {"litellm_provider": "deepseek", "mode": "chat", "input_cost_per_token": 2.8e-07,
                               "output_cost_per_token": 4.2e-07},
    "groq/openai/gpt-oss-120b": {"litellm_provider": "groq", "mode": "chat", "input_cost_per_token": 1.5e-07,
                                 "output_cost_per_token": 6e-07},
    "azure/gpt-x": {"litellm_provider": "azure", "mode": "chat", "input_cost_per_token": 1e-06,
                    "output_cost_per_token": 1e-06},
}
_OLD = {
    "gpt-x": {"litellm_provider": "openai", "mode": "chat", "input_cost_per_token": 9e-06,
              "output_cost_per_token": 9e-06},
    "claude-3-5-haiku-20241022": {"litellm_provider": "anthropic", "mode": "chat", "input_cost_per_token": 8e-07,
                                  "output_cost_per_token": 4e-06, "cache_read_input_token_cost": 8e-08,
                                  "cache_creation_input_token_cost": 1e-06,
                                  "cache_creation_input_token_cost_above_1hr": 6e-06},
    "claude-3-5-haiku-latest": {"litellm_provider": "anthropic", "mode": "chat", "input_cost_per_token": 1e-06,
                                "output_cost_per_token": 5e-06},
}


class GeneratorTests(SynchronousTestCase):
    """tools/update_prices.py turns LiteLLM's table into ours."""

    def generate(self):
        gen = _generator()
        paths = []
        for doc in (_NEW, _OLD):
            p = self.mktemp()
            with open(p, "w", encoding="utf-8") as f:
                json.dump(doc, f)
            paths.append(p)
        out = self.mktemp()
        notes = io.StringIO()
        with contextlib.redirect_stderr(notes):
            gen.main(
                ["--source", paths[0], "litellm 9.9.9", "2026-01-02",
                 "--source", paths[1], "litellm 1.0.0", "2025-01-01",
                 "--out", out, "--today", "2026-01-03"]
            )
        self.assertIn("dropped claude-3-5-haiku-latest", notes.getvalue())
        with open(out, encoding="utf-8") as f:
            doc = json.load(f)
        prices, sources = load_price_file(out)
        return doc, prices, sources

    def test_convertsBucketsAndTiers(self):
        """
        USD per token becomes USD per 1M tokens; cache read, 5-minute and
        1-hour writes and the above-N-k tiers are kept; batch and priority
        prices are not; an embedding without output costs 0 output.
        """
        doc, prices, _ = self.generate()
        self.assertEqual(
            prices["gpt-x"],
            Price(2.5, 15.0, 0.25, None, "2026-01-02",
                  "BerriAI/litellm model_prices_and_context_window.json (litellm 9.9.9, 2026-01-02)",
                  tiers=(Tier(272_000, input=5.0, output=22.5),)),
        )
        c = prices["claude-sonnet-4-5"]
        self.assertEqual((c.input, c.output, c.cached_input, c.cache_write, c.cache_write_1h), (3.0, 15.0, 0.3, 3.75, 6.0))
        self.assertEqual(c.tiers, (Tier(200_000, input=6.0, cache_write_1h=12.0),))
        self.assertEqual((prices["text-embedding-x"].input, prices["text-embedding-x"].output), (0.02, 0.0))
        self.assertEqual(doc["models"]["gpt-x"]["provider"], "openai")

    def test_selection(self):
        """
        Only token-priced chat/completion/embedding models of the chosen
        providers are kept, OpenAI-compatible providers' prefix dropped;
        other modes, other providers and LiteLLM's own keys are not.
        """
        _, prices, _ = self.generate()
        self.assertEqual(
            sorted(prices),
            ["claude-3-5-haiku-20241022", "claude-sonnet-4-5", "claude-sonnet-4-5-20250929", "deepseek-chat",
             "gpt-x", "openai/gpt-oss-120b", "text-embedding-x"],
        )

    def test_newestSourceWinsOlderAdds(self):
        """
        A model in both sources takes the newer price; one only the older
        lists is added with the older source's label and date.
        """
        doc, prices, sources = self.generate()
        self.assertEqual(prices["gpt-x"].input, 2.5)
        self.assertEqual(prices["claude-3-5-haiku-20241022"].as_of, "2025-01-01")
        self.assertIn("litellm 1.0.0", prices["claude-3-5-haiku-20241022"].source)
        self.assertEqual([s["date"] for s in sources], ["2026-01-02", "2025-01-01"])
        self.assertTrue(all(re.fullmatch(r"[0-9a-f]{64}", s["sha256"]) for s in sources))
        self.assertEqual(doc["generated"], "2026-01-03")

    def test_slipsDropped(self):
        """
        An alias priced differently from its snapshot is dropped (the
        provider bills the snapshot, and lookup derives it), and an
        Anthropic 1-hour write that is not 2x input is not shipped.
        """
        _, prices, _ = self.generate()
        self.assertNotIn("claude-3-5-haiku-latest", prices)
        self.assertIs(PriceTable(prices).lookup("claude-3-5-haiku-latest"), prices["claude-3-5-haiku-20241022"])
        self.assertIsNone(prices["claude-3-5-haiku-20241022"].cache_write_1h)
        self.assertEqual(prices["claude-sonnet-4-5"].cache_write_1h, 6.0)
