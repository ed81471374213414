"""The `relaygen` command: argv parsed in main, the commands in commands. Nothing in the
library imports this package."""

__all__: list[str] = []
