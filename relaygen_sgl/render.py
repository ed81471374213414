"""Terminal output: a trajectory with each segment marked by model, and its stats."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table
from rich.text import Text

from .result import RelayResult

STYLES = {"large": "bold cyan", "small": "green", "inserted": "dim"}


def print_result(result: RelayResult, console: Console | None = None) -> None:
    console = console or Console()
    body = Text()
    for seg in result.segments:
        body.append(f"[{seg.role[0].upper()}]", style="reverse " + STYLES.get(seg.role, ""))
        body.append(seg.text, style=STYLES.get(seg.role, ""))
    console.print(body)
    console.print()
    s = result.stats
    table = Table(title=f"{result.method}: {len(result.segments)} segments", show_header=True)
    for col in ("large tokens", "small tokens", "switches", "large share", "e2e s", "ttft s", "finish"):
        table.add_column(col, justify="right")
    table.add_row(str(s.large_tokens), str(s.small_tokens), str(s.switches), f"{s.large_share:.1%}",
                  f"{s.e2e_s:.2f}", f"{s.ttft_s:.2f}", s.finish)
    console.print(table)
    console.print(Text("answer: ", style="bold") + Text(result.answer or "(none)"))
