"""Hand-written kernels for what XLA leaves on the table (see each module)."""
