"""`tetriinfer top`: a running server's /metrics as a terminal view, refreshed in place.

The header shows the server, its model and uptime, requests in flight, the request rate and output
token throughput over the last interval, TTFT / TPOT / JCT p50 and p99 (estimated from the
histograms' buckets, since the server started), flips and restarts; then one row per instance.
With `rich` installed the view is a rich Live table; without it, plain text redrawn with ANSI codes.
Parsing and rates are `tetriinfer.bench.metrics_view` (no I/O there).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import urllib.error
import urllib.request

from tetriinfer.bench.metrics_view import Rates, Snapshot, histogram_quantile, parse_snapshot, rates

# QUEUED: prompt tokens not prefilled yet; XFER/S, BYTES/S: KV transfers; LOCAL/KEPT: prefills a decode
# instance did itself / requests a prefill instance decoded itself; HIT: prefix cache hit / queried tokens
COLUMNS = ("ID", "ROLE", "PID", "RUN", "WAIT", "QUEUED", "KV USED", "CACHED", "XFER/S", "BYTES/S", "LOCAL/KEPT",
           "HIT", "DRAIN")


class Unreachable(Exception):
    """The server did not answer, or answered an error: the message says which."""


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "top", help="live terminal view of a running server's /metrics",
        description=__doc__.splitlines()[0] + " `pip install rich` gives the nicer view (a live table); "
        "without it the view is plain text.")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server (`tetriinfer serve`)")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes (and between the "
                   "two reads --once makes, so that it shows rates)")
    p.add_argument("--once", action="store_true", help="print one view and exit (non-zero if the server is down)")
    p.add_argument("--api-key", default=None, metavar="KEY",  # not the environment's value: --help would print it
                   help="the server's --api-key, to read the model name from /v1/models; unset: $TETRIINFER_API_KEY")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for each HTTP answer")
    p.add_argument("--plain", action="store_true", help="plain text even when rich is installed")
    p.set_defaults(func=run)


def fetch(url: str, timeout: float, api_key: str | None = None) -> str:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.read().decode()
    except urllib.error.HTTPError as e:
        raise Unreachable(f"{url} answered HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:  # refused, timed out, unknown host, reset
        raise Unreachable(f"cannot reach {url}: {getattr(e, 'reason', e)} (is `tetriinfer serve` running there?)") from None


class Poller:
    """Reads /metrics (and the model name, once) and keeps the last two snapshots for the rates."""

    def __init__(self, url: str, timeout: float, api_key: str | None):
        self.url, self.timeout, self.api_key = url.rstrip("/"), timeout, api_key
        self.model: str | None = None
        self.prev: Snapshot | None = None
        self.cur: Snapshot | None = None
        self.error: str | None = None

    def poll(self) -> bool:
        try:
            text = fetch(f"{self.url}/metrics", self.timeout)
            if self.model is None:
                self.model = self._model()
            snap = parse_snapshot(text, time.monotonic())
        except (Unreachable, ValueError) as e:  # ValueError: not Prometheus text
            self.error = str(e)
            return False
        self.prev, self.cur, self.error = self.cur, snap, None
        return True

    def _model(self) -> str:
        try:
            models = json.loads(fetch(f"{self.url}/v1/models", self.timeout, self.api_key))
            return ", ".join(m["id"] for m in models["data"]) or "?"
        except Unreachable as e:
            return "? (pass --api-key)" if "401" in str(e) else "?"
        except (ValueError, KeyError, TypeError):
            return "?"


# ---- formatting ---------------------------------------------------------------------------------------
def seconds(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x * 1000:.1f} ms" if x < 1 else f"{x:.2f} s"


def per_s(x: float | None, unit: str = "") -> str:
    if x is None:
        return "-"
    for scale, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if x >= scale:
            return f"{x / scale:.1f} {prefix}{unit}"
    return f"{x:.1f} {unit}".rstrip()


def duration(s: float) -> str:
    s = int(max(s, 0))
    days, s = divmod(s, 86400)
    return (f"{days}d " if days else "") + f"{s // 3600:d}h{s // 60 % 60:02d}m{s % 60:02d}s"


def bar(fraction: float | None, width: int = 10, fill: str = "#", empty: str = ".") -> str:
    if fraction is None:
        return "-"
    n = round(min(max(fraction, 0.0), 1.0) * width)
    return f"{fill * n}{empty * (width - n)} {fraction * 100:3.0f}%"


def header(poller: Poller) -> list[str]:
    snap, r = poller.cur, _rates(poller)
    assert snap is not None
    up = f"  up {duration(time.time() - snap.start_time)}" if snap.start_time else ""
    dead = f", {snap.dead_instances:.0f} dead" if snap.dead_instances else ""
    lines = [f"{poller.url}  model {poller.model or '?'}{up}  instances {len(snap.instances)}{dead}"]
    done = ", ".join(f"{k} {v:.0f}" for k, v in snap.requests.items() if v)
    inflight = "-" if snap.requests_running is None else f"{snap.requests_running:.0f}"
    lines.append(f"requests: in flight {inflight}, running {sum(i.running for i in snap.instances):.0f}, "
                 f"waiting {snap.requests_waiting:.0f}; done {snap.requests_done:.0f}" + (f" ({done})" if done else ""))
    window = f"last {r.seconds:.1f} s" if r else "rates after the next read"
    lines.append(f"throughput ({window}): {per_s(r and r.requests, 'req/s')}, "
                 f"{per_s(r and r.output_tokens, 'tok/s')} output (finished requests)")
    quantiles = []
    for name, hist in snap.latencies.items():
        quantiles.append(f"{name.upper()} p50 {seconds(histogram_quantile(0.5, hist))} "
                         f"p99 {seconds(histogram_quantile(0.99, hist))}")
    count = max((h.count for h in snap.latencies.values()), default=0)
    lines.append(" | ".join(quantiles) + f"  (since start, {count:.0f} requests)" if quantiles else "no latencies yet")
    extra = []
    if snap.flips is not None:
        extra.append(f"flips {snap.flips:.0f}")
    if snap.restarts is not None:
        extra.append("restarts " + ", ".join(f"{k} {v:.0f}" for k, v in snap.restarts.items()))
    if extra:
        lines.append("; ".join(extra))
    return lines


def rows(poller: Poller, fill: str = "#", empty: str = ".") -> list[tuple[str, ...]]:
    snap, r = poller.cur, _rates(poller)
    assert snap is not None
    out = []
    for i in snap.instances:
        hit = i.prefix_hit_rate
        out.append((i.instance, i.role, str(i.pid or "-"), f"{i.running:.0f}", f"{i.waiting:.0f}",
                    f"{i.queued_prompt_tokens:.0f}",
                    f"{i.kv_blocks_used:.0f}/{i.kv_blocks_total:.0f} {bar(i.kv_used_fraction, 8, fill, empty)}",
                    f"{i.kv_blocks_cached:.0f}", per_s(r.kv_transfers.get(i.instance) if r else None),
                    per_s(r.kv_bytes.get(i.instance) if r else None, "B"),
                    f"{i.local_prefills:.0f}/{i.kept_decodes:.0f}", "-" if hit is None else f"{hit * 100:.0f}%",
                    "yes" if i.draining else ""))
    return out


def _rates(poller: Poller) -> Rates | None:
    return rates(poller.prev, poller.cur) if poller.prev is not None and poller.cur is not None else None


def plain_frame(poller: Poller) -> str:
    if poller.cur is None:
        return f"tetriinfer top: {poller.error}"
    table = [COLUMNS, *rows(poller)]
    widths = [max(len(row[c]) for row in table) for c in range(len(COLUMNS))]
    lines = header(poller) + [""] + ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table]
    if poller.error:
        lines.insert(0, f"!! {poller.error} (showing the last good read)")
    return "\n".join(lines)


def rich_frame(poller: Poller):
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    if poller.cur is None:
        return Text(f"tetriinfer top: {poller.error}", style="bold red")
    table = Table(box=None, header_style="bold cyan", pad_edge=False)
    for name in COLUMNS:
        table.add_column(name, no_wrap=True)
    for row in rows(poller, "█", "░"):
        table.add_row(*row, style="yellow" if row[-1] else None)
    parts = [Text(line, style="bold" if n == 0 else "") for n, line in enumerate(header(poller))]
    if poller.error:
        parts.insert(0, Text(f"{poller.error} (showing the last good read)", style="bold red"))
    return Group(*parts, Text(""), table)


def _use_rich(plain: bool) -> bool:
    if plain:
        return False
    try:
        import rich  # noqa: F401  (optional: `pip install rich`)
    except ImportError:
        return False
    return True


def run(args: argparse.Namespace) -> int:
    if args.interval <= 0 or args.timeout <= 0:
        raise ValueError("--interval and --timeout must be positive")
    api_key = args.api_key or os.environ.get("TETRIINFER_API_KEY")
    # Ctrl-C ends the view even when this process started with SIGINT ignored (a shell's
    # background job, or a parent that ignores it): Python leaves an inherited SIG_IGN in place.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    poller, fancy = Poller(args.url, args.timeout, api_key), _use_rich(args.plain)
    try:
        if args.once:
            if poller.poll():
                time.sleep(args.interval)
                poller.poll()
            if poller.cur is None or poller.error:
                print(f"tetriinfer top: {poller.error}", file=sys.stderr)
                return 1
            if fancy:
                from rich.console import Console

                console = Console()
                if not console.is_terminal:  # piped: no terminal width to fit, so do not squeeze the table
                    console = Console(width=160)
                console.print(rich_frame(poller))
            else:
                print(plain_frame(poller))
            return 0
        if fancy:
            from rich.live import Live

            with Live(rich_frame(poller), auto_refresh=False, screen=False) as live:
                while True:
                    poller.poll()
                    live.update(rich_frame(poller), refresh=True)
                    time.sleep(args.interval)
        tty = sys.stdout.isatty()
        while True:
            poller.poll()
            frame = plain_frame(poller)
            sys.stdout.write("\x1b[H\x1b[2J" + frame + "\n" if tty else frame + "\n\n")
            sys.stdout.flush()
            time.sleep(args.interval)
    except KeyboardInterrupt:  # Ctrl-C: leave quietly
        return 0
