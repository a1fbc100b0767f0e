"""Training: the shared loop (`fit`), scheduled teacher forcing, checkpoints, FLOPs/MFU, plots, XLA helpers."""
