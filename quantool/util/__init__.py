"""Small utilities with no knowledge of models: atomic writes, output folders, units, fault points, allocator."""
