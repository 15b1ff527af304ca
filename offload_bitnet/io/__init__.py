"""Bytes on disk and in memory: atomic files and fsync, the safetensors codec, reusable buffers, fault points, and
the locks that name their holder."""
