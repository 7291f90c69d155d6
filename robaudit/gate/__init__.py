"""The CI gate: policies, their verdicts, baselines, remedies and the empirical block."""
