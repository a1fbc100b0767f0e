"""The model pieces: MoE layer and kernels, expert parallelism, the CLIP tower, the projector, QLoRA."""
