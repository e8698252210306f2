"""The description parser on hostile whitespace: `python -m fedtina.experiments.parse_bench`.

Times `parse_label_text` on `"a" + " " * n + "andx"` (the input that took 55 s at n = 100,000 when a pattern
backtracked over the run) and on n names separated by " and ", up to the description limit, and prints a table:
the time per character stays flat when parsing is linear.
"""

from __future__ import annotations

import time

from fedtina.config import LimitsConfig
from fedtina.tina.generator import parse_label_text


def _seconds(text: str, limits: LimitsConfig, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        parse_label_text(text, limits)
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    limits = LimitsConfig(max_description_chars=10_000_000)   # past the default, to show the growth
    print("| input | chars | ms | ns/char |\n|---|---|---|---|")
    for n in (1_000, 10_000, 100_000, 1_000_000):
        for kind, text in (("whitespace run", "a" + " " * n + "andx"),
                           ("names joined by and", " and ".join(["oak"] * (n // 8)))):
            s = _seconds(text, limits)
            print(f"| {kind} | {len(text):,} | {s * 1e3:.2f} | {s / len(text) * 1e9:.0f} |")


if __name__ == "__main__":
    main()
