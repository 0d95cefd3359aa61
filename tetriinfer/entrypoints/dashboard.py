"""`tetriinfer dashboard`: the Grafana dashboard for a server's /metrics, written out for import.

The JSON ships inside the package (`tetriinfer/server/grafana/tetriinfer.json`), so a pip install
has it; this command only copies it out. Grafana asks for a Prometheus data source on import.
"""

from __future__ import annotations

import argparse
import sys
from importlib.resources import files

DASHBOARD = files("tetriinfer.server") / "grafana" / "tetriinfer.json"


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("dashboard", help="write the Grafana dashboard (JSON) for a server's /metrics",
                              description=__doc__.splitlines()[0])
    p.add_argument("--out", default="-", metavar="FILE", help="where to write it; '-': standard output")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    text = DASHBOARD.read_text()
    if args.out == "-":
        sys.stdout.write(text)
    else:
        with open(args.out, "w") as f:
            f.write(text)
        print(f"wrote {args.out}: in Grafana, Dashboards > New > Import, and pick the Prometheus data source "
              "that scrapes the server's /metrics", file=sys.stderr)
    return 0
