"""The flows: each composes the stages into one job a user runs (demo, nightly, simulate, replay), and the
steps they share: one protocol's train + evaluate (protocol), re-evaluating kept models (saved), the Feast stage
(features)."""
