"""handbackprop's benchmarks: scripts that print and save ratios (see benchmarks/README.md)."""
