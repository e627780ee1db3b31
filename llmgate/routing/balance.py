# -*- test-case-name: tests.routing.test_balance -*-
"""
Which deployment of a public model a request goes to: the deployments a
request may use, in order of preference (its own model's, then each
fallback model's), and the pick among the usable ones of a group.

Balancing is weighted random by default (the RNG is injected, so tests
choose the draw), or least outstanding requests (ties broken by weight),
or latency-aware (L{latency}): power of two choices, two distinct
deployments drawn by weight and the one with the lower score taken, where

    score = TTFT estimate x (1 + ERROR_WEIGHT x error ratio) x (1 + outstanding / (1 + mean outstanding))

with the TTFT estimate the deployment's EWMA aged towards zero while it
goes unmeasured (L{llmgate.routing.breaker.Breakers.ttft_estimate}), the
error ratio that of the breaker's window, and outstanding its requests in
flight from this process. A deployment never measured counts as fast as
the best measured one of its group (optimistic start: idle, it wins the
tie and gets measured; busy, its requests in flight spread the load).
Two random candidates rather than the best of all keep one stale or
noisy estimate from sending every request to the same deployment.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from llmgate.config import TAG_RULE, Config, Deployment, is_tag

Group = tuple[Deployment, ...]

# A deployment whose every request failed in the window scores this much
# worse than its TTFT alone (1 + 4 x 1.0 = 5x); half failing, 3x.
ERROR_WEIGHT = 4.0


def plan(config: Config, kind: str, model: str, tags: Sequence[str] = ()) -> Optional[list[Group]]:
    """
    The deployment groups for C{model} on a route of dialect C{kind}: its
    own deployments, then those of each fallback model in order; L{None}
    if nothing serves it (a model of another dialect, or unknown and no
    default provider). With C{tags} (L{request_tags}), only the
    deployments carrying all of them, in every group: an empty list when
    none does.
    """
    m = config.models.get(model)
    if m is None:
        for p in config.providers.values():
            if p.default and p.kind == kind:
                return _tagged([(Deployment(p.name, model),)], tags)
        return None
    if config.providers[m.provider].kind != kind:
        return None
    groups = [m.deployments]
    for name in m.fallbacks:
        fb = config.models.get(name)
        if fb is not None and config.providers[fb.provider].kind == kind:
            groups.append(fb.deployments)
    return _tagged(groups, tags)


# x-llmgate-tags: a request's required deployment tags, bounded.
TAGS_HEADER = b"x-llmgate-tags"
MAX_REQUEST_TAGS = 8
MAX_TAGS_HEADER_BYTES = 256


def request_tags(values: Optional[Sequence[bytes]]) -> tuple[str, ...]:
    """
    The tags a request requires, from its C{x-llmgate-tags} header values
    (comma-separated, several lines joined as HTTP joins them).

    @raise ValueError: with the message for the client's 400: too long,
        too many, or not a tag.
    """
    if not values:
        return ()
    raw = b",".join(values)
    if len(raw) > MAX_TAGS_HEADER_BYTES:
        raise ValueError(f"x-llmgate-tags: at most {MAX_TAGS_HEADER_BYTES} bytes")
    items = [t.strip() for t in raw.decode("latin-1").split(",")]
    if items == [""]:
        return ()
    tags: list[str] = []
    for t in items:
        if not is_tag(t):
            shown = repr(t) if t.isprintable() else "a tag with control characters"
            raise ValueError(f"x-llmgate-tags: {shown} is not a tag ({TAG_RULE}; comma-separated)")
        if t not in tags:
            tags.append(t)
    if len(tags) > MAX_REQUEST_TAGS:
        raise ValueError(f"x-llmgate-tags: at most {MAX_REQUEST_TAGS} tags")
    return tuple(tags)


def _tagged(groups: list[Group], tags: Sequence[str]) -> list[Group]:
    if not tags:
        return groups
    kept = [tuple(d for d in g if all(t in d.tags for t in tags)) for g in groups]
    return [g for g in kept if g]


def key(d: Deployment) -> tuple[str, str]:
    """The deployment's identity for breakers and the tried set."""
    return (d.provider, d.upstream_model)


def configured_keys(config: Config) -> set[tuple[str, str]]:
    """The keys of every deployment the config names (see L{key})."""
    return {key(d) for m in config.models.values() for d in m.deployments}


def weighted(deps: Sequence[Deployment], rng: Any) -> Deployment:
    """One of C{deps}, each with a chance proportional to its weight."""
    if len(deps) == 1:
        return deps[0]
    total = sum(d.weight for d in deps)
    r = rng.random() * total
    for d in deps:
        r -= d.weight
        if r < 0:
            return d
    return deps[-1]


def latency(deps: Sequence[Deployment], breakers: Any, rng: Any) -> Deployment:
    """
    Power of two choices among C{deps} (all usable): two distinct ones
    drawn by weight, the lower score wins (see the module docstring);
    on a tie, fewer requests in flight, then the unmeasured one, then the
    first drawn.
    """
    if len(deps) == 1:
        return deps[0]
    a = weighted(deps, rng)
    b = weighted([d for d in deps if d is not a], rng)
    estimates = {d: breakers.ttft_estimate(key(d)) for d in deps}
    measured = [e for e in estimates.values() if e is not None]
    best = min(measured) if measured else 0.0
    # In flight relative to the group's mean: a provider serves many
    # streams at once, so 100 in flight is not 100 times worse than one;
    # what matters is a deployment carrying more than its share.
    mean_out = sum(breakers.outstanding(key(d)) for d in deps) / len(deps)

    def rank(d: Deployment) -> tuple[float, int, int]:
        k = key(d)
        est = estimates[d]
        out = breakers.outstanding(k)
        score = (best if est is None else est) * (1 + ERROR_WEIGHT * breakers.error_ratio(k)) * (1 + out / (1 + mean_out))
        return (score, out, est is not None)

    return b if rank(b) < rank(a) else a


def first(groups: Sequence[Group], breakers: Any, rng: Any, balance: str = "weighted") -> Optional[Deployment]:
    """
    The deployment for a request's first attempt: as L{pick}; when only
    C{retry-after}s hold every usable one off, one of those anyway (its
    provider then answers for itself, as without routing): a 429 steers
    traffic to another deployment, it does not refuse the model.
    """
    return pick(groups, breakers, rng, balance) or pick(groups, breakers, rng, balance, skips=False)


def pick(
    groups: Sequence[Group], breakers: Any, rng: Any, balance: str = "weighted", tried: Any = (), skips: bool = True
) -> Optional[Deployment]:
    """
    The deployment for the next attempt: from the first group that has one
    not tried by this request and not held off by its breaker (or a
    C{retry-after}, unless C{skips} is false); L{None} when there is none.
    """
    for group in groups:
        usable = [d for d in group if key(d) not in tried and breakers.available(key(d), skips)]
        if not usable:
            continue
        if balance == "least_outstanding":
            least = min(breakers.outstanding(key(d)) for d in usable)
            usable = [d for d in usable if breakers.outstanding(key(d)) == least]
        elif balance == "latency":
            return latency(usable, breakers, rng)
        return weighted(usable, rng)
    return None


def wait(groups: Sequence[Group], breakers: Any) -> float:
    """Seconds until some deployment of C{groups} may be tried again."""
    return min(breakers.wait(key(d)) for g in groups for d in g)
