"""The lowest layer: settings, presets, model families, roles and methods, cue profiles,
results, JSONL records, locks, data sets, grading, the record of what `relaygen up` started,
and the typed errors. Imports nothing else of the package."""

__all__: list[str] = []
