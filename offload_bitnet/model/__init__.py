"""The model's math: configuration, block functions, ternary quantization, LoRA adapters, loss, AdamW."""
