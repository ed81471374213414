"""`relaygen show`: run records in the terminal and as an HTML page."""

__all__: list[str] = []
