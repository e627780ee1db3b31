# -*- test-case-name: tests.accounting.test_report -*-
"""
C{llmgate usage}: sums from the usage ledger, grouped by key/model/day/...

Reads the SQLite file read-only, so it can run while the daemon writes.
Costs are summed over known prices only; a group where no price was known
shows no cost (C{null} / C{-}), never 0, and every group says how many of
its requests had an unknown cost.

Every request has one row, so nothing is counted twice.  A request still in
flight has an C{open} row (with its progress so far, updated about once a
second): it is counted, and shown in the C{in_flight} column.  C{interrupted}
rows are requests a gateway was relaying when it died (C{kill -9}, power
loss), found open when it started again; their tokens are what was known
then, estimated.  (Open rows of a gateway that died and has not started
again still show as C{in_flight}.)

Requests the gateway refused itself (outcome C{rejected}: bad key, bad
body, unknown model, over a limit) reached no provider and cost nothing;
they are left out unless C{--include-rejected} is given, and the text
table says how many were left out.  (A client that hung up before its
request was relayed is C{client_cancelled}, still counted.)

C{--by served_model} groups by the model the provider's response named
(a router or fallback list may serve another model than the one asked
for); requests whose response named none (rejected ones, rows written
before the ledger had the column) form a group of their own (C{null} in
JSON, C{-} in the table).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sqlite3
import sys
from datetime import datetime, timezone
from typing import Any, Callable, Dict, List, Optional, Sequence, TextIO

from llmgate.accounting.ledger import connect_readonly

DEFAULT_LEDGER = "./llmgate-usage.db"
DEFAULT_BY = "key,model,day"

# --by name -> (output column, SQL expression)
GROUPS: Dict[str, tuple[str, str]] = {
    "key": ("key", "key_name"),
    "model": ("model", "model"),
    "day": ("day", "strftime('%Y-%m-%d', ts, 'unixepoch')"),
    "provider": ("provider", "provider"),
    "route": ("route", "route"),
    "outcome": ("outcome", "outcome"),
    "served_model": ("served_model", "served_model"),
}
# Groups on a column a ledger file written by an older version may lack
# (no daemon of this version has opened it yet): read as NULL there.
_NEWER_COLUMNS = {"served_model"}

# Output column -> SQL aggregate.  Token sums skip NULLs (requests with no
# usage at all, e.g. rejected ones); cost is NULL when no cost was known.
SUMS: List[tuple[str, str]] = [
    # A failed upstream attempt that was retried has its own row (with a
    # parent_request_id): it is no client request, and has no cost.
    ("requests", "COUNT(*) - COUNT(parent_request_id)"),
    ("input_tokens", "TOTAL(input_tokens)"),
    ("output_tokens", "TOTAL(output_tokens)"),
    ("cached_input_tokens", "TOTAL(cached_input_tokens)"),
    ("cache_creation_tokens", "TOTAL(cache_creation_tokens)"),
    ("cache_creation_1h_tokens", "TOTAL(cache_creation_1h_tokens)"),
    ("reasoning_tokens", "TOTAL(reasoning_tokens)"),
    ("cost_usd", "SUM(cost_usd)"),
    # Client requests without a cost (an attempt's row, priced or not, is
    # none; a hedge that lost has its own cost, counted in cost_usd).
    ("unknown_cost", "COUNT(*) - COUNT(cost_usd) - COUNT(parent_request_id) + COUNT(parent_request_id || cost_usd)"),
    ("estimated", "TOTAL(source = 'estimated')"),
    ("in_flight", "TOTAL(outcome = 'open')"),
    ("interrupted", "TOTAL(outcome = 'interrupted')"),
    ("failed_attempts", "COUNT(parent_request_id)"),
]
_INT_SUMS = {name for name, _ in SUMS if name != "cost_usd"}
# Sums of a column an older ledger file may lack: 0 there.
_NEWER_SUMS = {"cache_creation_1h_tokens", "parent_request_id"}

# Shorter headers for the text table, so it fits a terminal.
_TEXT_HEADERS = {
    "input_tokens": "input",
    "output_tokens": "output",
    "cached_input_tokens": "cached_in",
    "cache_creation_tokens": "cache_write",
    "cache_creation_1h_tokens": "write_1h",
    "reasoning_tokens": "reasoning",
    "unknown_cost": "unpriced",
    "budget_usd": "budget",
    "period_spent_usd": "spent_in_period",
    "budget_used": "used",
}


class UsageError(Exception):
    """
    A bad option value; the message is for the user.
    """


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """
    Add the C{usage} subcommand's options to C{parser}.
    """
    parser.add_argument(
        "--ledger",
        default=DEFAULT_LEDGER,
        metavar="PATH",
        help="usage ledger SQLite file (default: %(default)s)",
    )
    parser.add_argument(
        "--since",
        metavar="WHEN",
        help="only requests started at or after WHEN (YYYY-MM-DD or ISO "
        "datetime; UTC unless an offset is given)",
    )
    parser.add_argument(
        "--until",
        metavar="WHEN",
        help="only requests started before WHEN (exclusive: "
        "--since 2024-05-01 --until 2024-06-01 is all of May)",
    )
    parser.add_argument(
        "--by",
        default=DEFAULT_BY,
        metavar="FIELDS",
        help="comma list of %s (default: %%(default)s)" % (",".join(GROUPS),),
    )
    parser.add_argument(
        "--include-rejected",
        action="store_true",
        help="count the requests the gateway refused itself (outcome rejected), "
        "left out by default",
    )
    parser.add_argument(
        "--config",
        default="llmgate.toml",
        metavar="PATH",
        help="the daemon's config, to find its key file ([keys] file, or llmgate-keys.json "
        "beside it): with --by key, each key's budget and its spend in the current period "
        "are shown (default: %(default)s; no key file, no budget columns)",
    )
    parser.add_argument("--key-file", metavar="PATH", help="the key file (default: found from --config)")
    fmt = parser.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print JSON")
    fmt.add_argument("--csv", action="store_true", help="print CSV")


def parse_when(value: str) -> float:
    """
    A date or ISO datetime as a unix timestamp; naive means UTC.

    @raise UsageError: if C{value} is neither.
    """
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise UsageError(
            "not a date or ISO datetime: %r (try YYYY-MM-DD)" % (value,)
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.timestamp()


def parse_by(value: str) -> List[str]:
    """
    @raise UsageError: on an unknown or empty grouping.
    """
    names = [n.strip() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in GROUPS]
    if unknown or not names:
        raise UsageError(
            "--by takes a comma list of %s, got %r" % (", ".join(GROUPS), value)
        )
    return list(dict.fromkeys(names))


def query(
    conn: sqlite3.Connection,
    by: Sequence[str],
    since: Optional[float] = None,
    until: Optional[float] = None,
    include_rejected: bool = True,
) -> List[Dict[str, Any]]:
    """
    One dict per group, sorted by the group columns.  C{by} may be empty:
    then there is one row with the grand total (none if no requests).
    """
    groupCols = [GROUPS[b][0] for b in by]
    missing: set[str] = set()
    have = {row[1] for row in conn.execute("PRAGMA table_info(usage)")}
    if have:
        missing = (_NEWER_COLUMNS | _NEWER_SUMS) - have
    select = [
        "%s AS %s" % ("NULL" if b in missing else GROUPS[b][1], GROUPS[b][0]) for b in by
    ]
    if "parent_request_id" in missing:
        # A file from before retries: every row is a client request.
        select += ["%s AS %s" % ("0" if name in missing else expr.replace("COUNT(parent_request_id || cost_usd)", "0").replace("COUNT(parent_request_id)", "0"), name) for name, expr in SUMS]
    else:
        select += ["%s AS %s" % ("0" if name in missing else expr, name) for name, expr in SUMS]
    where, params = [], []
    if since is not None:
        where.append("ts >= ?")
        params.append(since)
    if until is not None:
        where.append("ts < ?")
        params.append(until)
    if not include_rejected:
        where.append("outcome != 'rejected'")
    sql = "SELECT %s FROM usage" % (", ".join(select),)
    if where:
        sql += " WHERE " + " AND ".join(where)
    if groupCols:
        cols = ", ".join(groupCols)
        sql += " GROUP BY %s ORDER BY %s" % (cols, cols)
    try:
        cursor = conn.execute(sql, params)
    except sqlite3.OperationalError as e:
        if "no such table" in str(e):
            return []  # the daemon has not written its first batch yet
        raise
    names = [d[0] for d in cursor.description]
    rows = []
    for values in cursor:
        row = dict(zip(names, values))
        if row["requests"] == 0 and not row["failed_attempts"]:
            continue  # aggregate with no GROUP BY over no rows
        for name in _INT_SUMS:
            row[name] = int(row[name])
        if row["cost_usd"] is not None:
            # Float sums of many small prices pick up noise like ...0004.
            row["cost_usd"] = round(row["cost_usd"], 10)
        rows.append(row)
    return rows


def count_rejected(conn: sqlite3.Connection, since: Optional[float] = None, until: Optional[float] = None) -> int:
    """How many requests in the range the gateway refused itself."""
    sql, params = "SELECT COUNT(*) FROM usage WHERE outcome = 'rejected'", []
    if since is not None:
        sql += " AND ts >= ?"
        params.append(since)
    if until is not None:
        sql += " AND ts < ?"
        params.append(until)
    try:
        return int(conn.execute(sql, params).fetchone()[0])
    except sqlite3.OperationalError as e:
        if "no such table" in str(e):
            return 0
        raise


def total(rows: List[Dict[str, Any]]) -> Dict[str, Any]:
    """
    The sums over C{rows}, with the same unknown-cost rule.
    """
    out: Dict[str, Any] = {name: 0 for name in _INT_SUMS}
    costs = [r["cost_usd"] for r in rows if r["cost_usd"] is not None]
    for r in rows:
        for name in _INT_SUMS:
            out[name] += r[name]
    out["cost_usd"] = round(sum(costs), 10) if costs else None
    return {name: out[name] for name, _ in SUMS}


def _fmtCost(cost: Optional[float]) -> str:
    return "-" if cost is None else "%.6f" % (cost,)


def _fmtExtra(name: str, value: Any) -> str:
    if value is None:
        return "-"
    if name == "budget_used":
        return "%.1f%%" % (value * 100,)
    if isinstance(value, float):
        return _fmtCost(value)
    return str(value)


def write_table(
    out: TextIO, groupCols: List[str], rows: List[Dict[str, Any]], extra: Sequence[str] = ()
) -> None:
    """
    An aligned text table with a TOTAL line; text left, numbers right.
    """
    header = groupCols + [_TEXT_HEADERS.get(name, name) for name, _ in SUMS] + [_TEXT_HEADERS.get(n, n) for n in extra]
    body = []
    for r in rows:
        line = ["-" if r[c] is None else str(r[c]) for c in groupCols]
        line += [
            _fmtCost(r[n]) if n == "cost_usd" else str(r[n]) for n, _ in SUMS
        ]
        line += [_fmtExtra(n, r.get(n)) for n in extra]
        body.append(line)
    t = total(rows)
    totalLine = (["TOTAL"] + [""] * (len(groupCols) - 1)) if groupCols else []
    totalLine += [_fmtCost(t[n]) if n == "cost_usd" else str(t[n]) for n, _ in SUMS]
    totalLine += [""] * len(extra)
    lines = [header] + body + [totalLine]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    nText = len(groupCols)

    def fmt(line: List[str]) -> str:
        cells = [
            cell.ljust(w) if i < nText else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(line, widths))
        ]
        return "  ".join(cells).rstrip()

    out.write(fmt(header) + "\n")
    out.write("  ".join("-" * w for w in widths) + "\n")
    for line in body:
        out.write(fmt(line) + "\n")
    out.write(fmt(totalLine) + "\n")


# Extra columns for the rows of a report: called with the parsed args and
# the rows (grouped by key), it adds its columns to each row and returns
# their names (none: no columns).  The budget columns are added this way
# (llmgate.policy.usage), so this module does not depend on the policy.
Annotate = Callable[[argparse.Namespace, List[Dict[str, Any]]], List[str]]


def run(args: argparse.Namespace, annotate: Optional[Annotate] = None) -> int:
    """
    Print the report for parsed C{args}; return the exit code.

    @param annotate: adds columns to the rows when they are grouped by key.
    """
    out, err = sys.stdout, sys.stderr
    try:
        by = parse_by(args.by)
        since = parse_when(args.since) if args.since else None
        until = parse_when(args.until) if args.until else None
    except UsageError as e:
        err.write("llmgate usage: %s\n" % (e,))
        return 2
    try:
        conn = connect_readonly(args.ledger)
    except FileNotFoundError:
        err.write(
            "llmgate usage: no ledger at %s (pass --ledger PATH; the daemon "
            "creates it on its first write)\n" % (args.ledger,)
        )
        return 1
    include = bool(getattr(args, "include_rejected", False))
    try:
        rows = query(conn, by, since, until, include_rejected=include)
        left_out = 0 if include else count_rejected(conn, since, until)
    except sqlite3.DatabaseError as e:
        err.write("llmgate usage: cannot read %s: %s\n" % (args.ledger, e))
        return 1
    finally:
        conn.close()

    groupCols = [GROUPS[b][0] for b in by]
    extra: List[str] = []
    if annotate is not None and "key" in by:
        extra = annotate(args, rows)
    try:
        _write(args, out, groupCols, rows, left_out, include, extra)
        out.flush()
    except BrokenPipeError:
        # The reader went away (`llmgate usage | head -1`): it has what it
        # wanted.  Point stdout at /dev/null so the interpreter's last
        # flush does not fail again, and exit quietly.
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, out.fileno())
        except (OSError, ValueError, io.UnsupportedOperation):
            pass
        finally:
            os.close(devnull)
    return 0


def _write(
    args: argparse.Namespace, out: TextIO, groupCols: List[str], rows: List[Dict[str, Any]], left_out: int, include: bool,
    extra: Sequence[str] = (),
) -> None:
    if args.json:
        doc = {
            "ledger": args.ledger,
            "by": groupCols,
            "since": args.since,
            "until": args.until,
            "include_rejected": include,
            "rejected_left_out": left_out,
            "rows": rows,
            "total": total(rows),
        }
        json.dump(doc, out, indent=2)
        out.write("\n")
    elif args.csv:
        w = csv.writer(out, lineterminator="\n")
        w.writerow(groupCols + [n for n, _ in SUMS] + list(extra))
        for r in rows:
            w.writerow(
                [r[c] for c in groupCols]
                + ["" if r[n] is None else r[n] for n, _ in SUMS]
                + ["" if r.get(n) is None else r[n] for n in extra]
            )
    else:
        write_table(out, groupCols, rows, extra)
        if left_out:
            out.write(
                "(%d request%s the gateway refused itself not counted: --include-rejected)\n"
                % (left_out, "" if left_out == 1 else "s")
            )


def main(argv: Optional[Sequence[str]] = None) -> int:
    """
    Standalone entry point (C{python -m llmgate.accounting.report}); the C{llmgate}
    console script wires L{add_arguments}/L{run} as its C{usage} command.
    """
    parser = argparse.ArgumentParser(prog="llmgate usage")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
