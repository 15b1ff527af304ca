"""The tokenizers a store carries, and loading one given by path."""
