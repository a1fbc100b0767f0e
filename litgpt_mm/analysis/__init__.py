"""Analyses computed from configs rather than from runs: the capacity plan and the preflight memory check."""
