"""Data preparation and loading for pretraining, alignment and instruction tuning."""
