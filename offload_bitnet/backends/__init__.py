"""Compute backends: the block math, quantization, loss and AdamW of one streamed step, per array library."""
