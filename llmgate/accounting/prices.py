# -*- test-case-name: tests.accounting.test_prices -*-
"""
Model prices and the cost of a L{llmgate.accounting.usage.Usage}.

Prices are USD per 1M tokens, in four buckets: uncached input, output
(reasoning included), cached input reads, and cache writes (Anthropic's
5-minute cache write is 1.25x input). Because ``Usage.input_tokens`` is the
total prompt and the cache counts are parts of it, cost is::

    (input - cached - creation) * input + cached * cached_input
      + creation * cache_write + output * output

so nothing is charged twice. A bucket without its own price is charged at
the input rate (dearer, never cheaper, than the truth).

THE SHIPPED DEFAULTS MUST BE CHECKED before money depends on them. They are
list prices as known when this module was written (no network was
available to confirm them), each marked with ``as_of`` and the provider's
pricing page in ``source``. Operators override them in config
(L{PriceTable.from_config}). An unknown model has no price: L{cost}
returns None, never 0, so callers can tell "free" from "unpriced".
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

__all__ = ["Price", "PriceTable", "DEFAULT_PRICES", "OPENAI_PRICING_URL", "ANTHROPIC_PRICING_URL"]

OPENAI_PRICING_URL = "https://openai.com/api/pricing/"
ANTHROPIC_PRICING_URL = "https://www.anthropic.com/pricing#api"
_AS_OF = "2025-10-01"  # list prices as last known; unverified offline


@dataclass(frozen=True)
class Price:
    """USD per 1M tokens. None for a cache bucket means "use input"."""

    input: float
    output: float
    cached_input: float | None = None
    cache_write: float | None = None
    as_of: str = ""
    source: str = ""


def _oai(inp, out, cached=None, as_of=_AS_OF):
    return Price(inp, out, cached, None, as_of, OPENAI_PRICING_URL)


def _ant(inp, out):
    # Anthropic: cache read 0.1x input, 5-minute cache write 1.25x input.
    return Price(inp, out, round(inp * 0.1, 6), round(inp * 1.25, 6), _AS_OF, ANTHROPIC_PRICING_URL)


DEFAULT_PRICES: dict[str, Price] = {
    # OpenAI
    "gpt-4o": _oai(2.50, 10.00, 1.25),
    "gpt-4o-2024-05-13": _oai(5.00, 15.00),  # the first snapshot kept its launch price
    "chatgpt-4o-latest": _oai(5.00, 15.00),
    "gpt-4o-mini": _oai(0.15, 0.60, 0.075),
    "gpt-4.1": _oai(2.00, 8.00, 0.50),
    "gpt-4.1-mini": _oai(0.40, 1.60, 0.10),
    "gpt-4.1-nano": _oai(0.10, 0.40, 0.025),
    "gpt-5": _oai(1.25, 10.00, 0.125),
    "gpt-5-mini": _oai(0.25, 2.00, 0.025),
    "gpt-5-nano": _oai(0.05, 0.40, 0.005),
    "o1": _oai(15.00, 60.00, 7.50),
    "o3": _oai(2.00, 8.00, 0.50),
    "o3-mini": _oai(1.10, 4.40, 0.55),
    "o4-mini": _oai(1.10, 4.40, 0.275),
    "gpt-4-turbo": _oai(10.00, 30.00),
    "gpt-4": _oai(30.00, 60.00),
    "gpt-3.5-turbo": _oai(0.50, 1.50),
    "text-embedding-3-small": _oai(0.02, 0.0),
    "text-embedding-3-large": _oai(0.13, 0.0),
    "text-embedding-ada-002": _oai(0.10, 0.0),
    # Anthropic (standard context; long-context premiums are not modelled)
    "claude-opus-4-5": _ant(5.00, 25.00),
    "claude-opus-4-1": _ant(15.00, 75.00),
    "claude-opus-4": _ant(15.00, 75.00),
    "claude-sonnet-4-5": _ant(3.00, 15.00),
    "claude-sonnet-4": _ant(3.00, 15.00),
    "claude-3-7-sonnet": _ant(3.00, 15.00),
    "claude-haiku-4-5": _ant(1.00, 5.00),
    "claude-3-5-haiku": _ant(0.80, 4.00),
    "claude-3-haiku": Price(0.25, 1.25, 0.03, 0.30, _AS_OF, ANTHROPIC_PRICING_URL),
}

# What may follow a table key for the key's price to apply: a dated or
# numbered snapshot ("-2024-08-06", "-20250929", "-0613") or "-latest".
# Anything else ("gpt-4.1-nano" vs "gpt-4.1") is a different model, and a
# wrong price is worse than none.
_SNAPSHOT = re.compile(r"-(?:\d{4}-\d{2}-\d{2}|\d{8}|\d{4}|latest)")

_FIELDS = ("input", "output", "cached_input", "cache_write")
_REQUIRED = ("input", "output")
_OPTIONAL_TEXT = ("as_of", "source")


class PriceTable:
    """Model name -> L{Price}, with snapshot-aware lookup and costing."""

    def __init__(self, entries: dict[str, Price]) -> None:
        self.entries = dict(entries)
        # Longest key first, so "gpt-4o-mini" wins over "gpt-4o".
        self._by_length = sorted(self.entries, key=len, reverse=True)

    def lookup(self, model: str) -> Price | None:
        """
        The exact entry, else the longest key that C{model} extends with a
        snapshot suffix (gpt-4o-2024-08-06 -> gpt-4o), else None.
        """
        price = self.entries.get(model)
        if price is not None:
            return price
        for key in self._by_length:
            if model.startswith(key) and _SNAPSHOT.fullmatch(model, len(key)):
                return self.entries[key]
        return None

    def cost(self, model: str, usage) -> float | None:
        """
        USD for C{usage} on C{model}; None if the model has no price or the
        usage has no counts. Missing counts (None) are taken as 0: callers
        fill in estimates first when they want them charged.
        """
        price = self.lookup(model)
        if price is None or usage is None:
            return None
        if usage.input_tokens is None and usage.output_tokens is None:
            return None
        total_in = usage.input_tokens or 0
        cached = max(0, usage.cached_input_tokens or 0)
        creation = max(0, usage.cache_creation_tokens or 0)
        uncached = max(0, total_in - cached - creation)
        cached_rate = price.input if price.cached_input is None else price.cached_input
        write_rate = price.input if price.cache_write is None else price.cache_write
        micro = (
            uncached * price.input
            + cached * cached_rate
            + creation * write_rate
            + (usage.output_tokens or 0) * price.output
        )
        return micro / 1_000_000

    @classmethod
    def from_config(cls, mapping, defaults: bool = True) -> "PriceTable":
        """
        Build a table from config: C{mapping} is model -> {input, output,
        cached_input?, cache_write?, as_of?, source?} in USD per 1M tokens.
        An entry replaces the default for that model entirely (an omitted
        cache price means "charge input rate", not "keep the default").

        @raise ValueError: naming the bad model or key.
        """
        entries = dict(DEFAULT_PRICES) if defaults else {}
        if mapping is None:
            mapping = {}
        if not isinstance(mapping, dict):
            raise ValueError("prices: expected a mapping of model name to prices")
        for model, spec in mapping.items():
            where = f"prices[{model!r}]"
            if not isinstance(model, str) or not model:
                raise ValueError(f"{where}: model name must be a non-empty string")
            if not isinstance(spec, dict):
                raise ValueError(f"{where}: expected a mapping with input and output")
            for key in spec:
                if key not in _FIELDS and key not in _OPTIONAL_TEXT:
                    raise ValueError(
                        f"{where}.{key}: unknown key; allowed: {', '.join(_FIELDS + _OPTIONAL_TEXT)}"
                    )
            for key in _REQUIRED:
                if key not in spec:
                    raise ValueError(f"{where}.{key}: missing")
            values = {}
            for key in _FIELDS:
                if key in spec:
                    v = spec[key]
                    if (
                        isinstance(v, bool)
                        or not isinstance(v, (int, float))
                        or not math.isfinite(v)
                        or v < 0
                    ):
                        raise ValueError(f"{where}.{key}: must be a non-negative number, got {v!r}")
                    values[key] = float(v)
            for key in _OPTIONAL_TEXT:
                if key in spec and not isinstance(spec[key], str):
                    raise ValueError(f"{where}.{key}: must be a string")
            entries[model] = Price(
                input=values["input"],
                output=values["output"],
                cached_input=values.get("cached_input"),
                cache_write=values.get("cache_write"),
                as_of=spec.get("as_of", ""),
                source=spec.get("source", "config"),
            )
        return cls(entries)
