"""Model plumbing: structure discovery, calibration data, layer-by-layer execution."""
