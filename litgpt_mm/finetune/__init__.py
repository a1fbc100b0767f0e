"""Instruction tuning (stage 3)."""
