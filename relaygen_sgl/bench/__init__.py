"""`relaygen bench`: speed, load and handoff measurements on a live pair, with the
machine described and a markdown report and plot."""

__all__: list[str] = []
