"""The streaming step: forward block by block, replayed backward, updates written behind, prefetch."""
