"""The description parser on hostile whitespace and long label sets: time per character, flat when parsing is linear.

Times `parse_label_text` on `"a" + " " * n + "andx"` (the input that took 55 s at n = 100,000 when a pattern
backtracked over the whitespace run) and on names joined by " and ", for each n in `sizes`, with the description
limit raised past the largest input.

    python -m fedtina.experiments.parse ['sizes=[1000,10000,100000,1000000]']
"""

from __future__ import annotations

import time
from pathlib import Path

from fedtina.config import LimitsConfig
from fedtina.tina.generator import parse_label_text

ASSETS = None   # no assets: the parser alone


def _seconds(text: str, limits: LimitsConfig, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        parse_label_text(text, limits)
        best = min(best, time.perf_counter() - t0)
    return best


def _table(data: dict) -> str:
    return "\n".join(["| input | chars | ms | ns/char |", "|---|---|---|---|",
                      *(f"| {r['input']} | {r['chars']:,} | {r['s'] * 1e3:.2f} | {r['s'] / r['chars'] * 1e9:.0f} |"
                        for r in data["rows"])])


def run(cfg: dict, assets, out_dir: Path):
    from fedtina.experiments.harness import Result

    sizes = [int(n) for n in cfg["sizes"]]
    limits = LimitsConfig(max_description_chars=2 * max(sizes) + 16)   # past the default, to show the growth
    rows = []
    for n in sizes:
        for kind, text in (("whitespace run", "a" + " " * n + "andx"),
                           ("names joined by and", " and ".join(["oak"] * (n // 8)))):
            rows.append({"input": kind, "chars": len(text), "s": _seconds(text, limits)})
    return Result({"rows": rows}, _table)


if __name__ == "__main__":
    from fedtina.experiments import harness

    harness.main(__spec__.name)
