#!/usr/bin/env python3
"""Draws the benchmark's JSON (benches/relay.rs writes it) as one SVG:
throughput, throughput per core of proxy CPU, session rate, session time
and 1-byte round trip (p99), and user-space memory per idle relaying
session, one bar per server (medians, with the
min-max range as a whisker). Standard library only.

    python3 benches/chart.py target/bench-relay.json benches/results/chart.svg
"""

import json
import sys
from html import escape

PANELS = [
    ("throughput, 1 stream (Gbit/s)", lambda t: med(t["throughput_gbit"]), lambda t: rng(t["throughput_gbit"])),
    ("Gbit/s per core of proxy CPU", lambda t: per_core(t, "throughput_gbit", "throughput_cores"), None),
    ("sessions/s", lambda t: med(t["sessions_per_s"]), lambda t: rng(t["sessions_per_s"])),
    ("session time p99, µs (lower is better)", lambda t: med(t.get("session_p99_us")), lambda t: rng(t.get("session_p99_us"))),
    ("1-byte round trip p99, µs (lower is better)", lambda t: med(t["rtt_p99_us"]), lambda t: rng(t["rtt_p99_us"])),
    ("memory per idle session (bytes, log scale)", lambda t: t.get("idle_bytes_per_session"), None),
]

COLOURS = {"slabsocks": "#1f6feb", "direct": "#8b949e"}
OTHER = "#d29922"


def med(s):
    return s.get("median") if isinstance(s, dict) else None


def rng(s):
    if not isinstance(s, dict) or s.get("min") is None:
        return None
    return (s["min"], s["max"])


def per_core(t, what, cores):
    a, c = med(t[what]), med(t[cores])
    return a / c if a is not None and c else None


def fmt(v):
    if v >= 100:
        return f"{v:,.0f}"
    return f"{v:.2f}" if v < 10 else f"{v:.1f}"


def panel(out, x0, y0, width, title, rows, log=False):
    """One bar chart: rows are (name, value, range or None)."""
    import math

    rows = [r for r in rows if r[1] is not None]
    out.append(f'<text x="{x0}" y="{y0}" font-size="14" font-weight="bold">{escape(title)}</text>')
    if not rows:
        out.append(f'<text x="{x0}" y="{y0 + 22}" font-size="12">not measured</text>')
        return y0 + 40
    top = max(max(v, r[1] if r else v) for _, v, r in rows)
    label_w, bar_h, gap = 110, 18, 6

    def scale(v):
        if log:
            return (math.log10(max(v, 1)) / math.log10(max(top, 10))) * (width - label_w - 90)
        return v / top * (width - label_w - 90) if top > 0 else 0

    y = y0 + 12
    for name, v, r in rows:
        colour = COLOURS.get(name, OTHER)
        out.append(f'<text x="{x0}" y="{y + 13}" font-size="12">{escape(name)}</text>')
        w = max(scale(v), 1)
        out.append(f'<rect x="{x0 + label_w}" y="{y}" width="{w:.1f}" height="{bar_h}" fill="{colour}"/>')
        if r:
            a, b = x0 + label_w + scale(r[0]), x0 + label_w + scale(r[1])
            mid = y + bar_h / 2
            out.append(f'<line x1="{a:.1f}" y1="{mid}" x2="{b:.1f}" y2="{mid}" stroke="#000" stroke-width="1"/>')
        out.append(f'<text x="{x0 + label_w + w + 6:.1f}" y="{y + 13}" font-size="12">{fmt(v)}</text>')
        y += bar_h + gap
    return y + 18


def main():
    src = sys.argv[1] if len(sys.argv) > 1 else "target/bench-relay.json"
    dst = sys.argv[2] if len(sys.argv) > 2 else "benches/results/chart.svg"
    with open(src) as f:
        data = json.load(f)
    targets = data["targets"]
    width = 560
    out = []
    y = 50
    for title, value, whisker in PANELS:
        rows = [(t["name"], value(t), whisker(t) if whisker else None) for t in targets]
        if title.startswith("memory") or title.startswith("Gbit/s per"):
            rows = [r for r in rows if r[0] != "direct"]
        y = panel(out, 20, y, width, title, rows, log=title.startswith("memory"))
    head = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{y + 10}" font-family="sans-serif">',
        f'<rect width="100%" height="100%" fill="#fff"/>',
        f'<text x="20" y="24" font-size="15" font-weight="bold">slabsocks and its peers, loopback</text>',
        f'<text x="20" y="40" font-size="11">{escape(data.get("machine", ""))}; '
        f'{data.get("rounds", "?")} rounds, medians, whiskers min-max</text>',
    ]
    with open(dst, "w") as f:
        f.write("\n".join(head + out + ["</svg>"]) + "\n")
    print(f"wrote {dst}")


if __name__ == "__main__":
    main()
