"""`relaygen calibrate`: switch cues for a model pair from the large model's own
trajectories, with a cache of scored trajectories and plots."""

__all__: list[str] = []
