"""The flows: each composes the stages into one job a user runs (nightly; the demo lives in recsys.pipeline)."""
