"""Analyses: the capacity plan, the preflight memory check, expert-routing analysis, benchmark helpers."""
