# -*- test-case-name: tests.test_cli -*-
"""
The C{llmgate} console script: everything that is not the daemon.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from llmgate import config as configmod


def _check_config(args: argparse.Namespace) -> int:
    """
    The daemon's own checks (L{configmod.load}, L{configmod.listen_endpoints}),
    so a file and ports that pass here start the daemon. Nothing listens:
    a port already in use is found only at start.
    """
    try:
        # Run outside systemd: a systemd: endpoint is checked for syntax only.
        cfg = configmod.load(args.path, inherited=False)
        ports = configmod.listen_endpoints(args.port, not cfg.keyed, inherited=False)
    except configmod.ConfigError as e:
        print(f"invalid configuration: {e}", file=sys.stderr)
        return 1
    print(
        f"{args.path}: OK ({len(cfg.providers)} providers, {len(cfg.models)} models, "
        f"{len(cfg.keys) + len(cfg.key_records)} gateway keys; listens on {', '.join(ports)}"
        + (f"; metrics on {cfg.metrics_port}" if cfg.metrics_port else "")
        + ")"
    )
    return 0


def _usage(args: argparse.Namespace) -> int:
    from llmgate.accounting import report
    from llmgate.policy.usage import annotator

    # With --by key: each key's budget and its spend in the current period.
    return report.run(args, annotate=annotator())


def _version() -> str:
    import platform

    from llmgate import __version__

    # Not llmgate.tap's version_line: importing the daemon's modules would
    # make every `llmgate usage` pay for them.
    return f"llmgate {__version__} (Python {platform.python_version()})"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llmgate", description=__doc__.strip())
    p.add_argument("--version", action="version", version=_version(), help="print the version and exit")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check-config", help="validate a TOML config file")
    c.add_argument("path")
    c.add_argument(
        "--port", "-p", action="append", default=[],
        help="a --port value the daemon will be given, to check too (repeatable)",
    )
    c.set_defaults(func=_check_config)
    u = sub.add_parser("usage", help="sum tokens and cost from the usage ledger")
    try:
        from llmgate.accounting import report

        report.add_arguments(u)
    except ImportError:  # pragma: no cover - report ships with the package
        pass
    u.set_defaults(func=_usage)
    k = sub.add_parser("keys", help="create, list and revoke gateway keys in the key file")
    from llmgate.policy import cli as keys_cli

    keys_cli.add_arguments(k)
    k.set_defaults(func=keys_cli.run)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
