"""The whole model in memory (autograd + torch.optim.AdamW): what the engine is checked against."""
