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
    try:
        cfg = configmod.load(args.path)
    except configmod.ConfigError as e:
        print(f"invalid configuration: {e}", file=sys.stderr)
        return 1
    print(
        f"{args.path}: OK ({len(cfg.providers)} providers, {len(cfg.models)} models, "
        f"{len(cfg.keys)} gateway keys)"
    )
    return 0


def _usage(args: argparse.Namespace) -> int:
    from llmgate.accounting import report

    return report.run(args)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llmgate", description=__doc__.strip())
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check-config", help="validate a TOML config file")
    c.add_argument("path")
    c.set_defaults(func=_check_config)
    u = sub.add_parser("usage", help="sum tokens and cost from the usage ledger")
    try:
        from llmgate.accounting import report

        report.add_arguments(u)
    except ImportError:  # pragma: no cover - report ships with the package
        pass
    u.set_defaults(func=_usage)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
