"""Metrics and benchmark readers for `recipes/evaluate.py`: POPE, COCO captions, VQA-style accuracy, WER, bootstrap."""
