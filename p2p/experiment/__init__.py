"""The experiment tooling: records, the one road from a record to files (run), photos and their
inversion files, outputs, and the grids of cells that sweeps and benchmarks share."""
