"""The block store: unit names and shapes, the folder of per-unit files with atomic commits, how each mode lays a unit out, 8-bit optimizer state, sizes, and writing new stores."""
