"""What scores mean: the results store (store), the paper's tables (tables), figures (plots) and
GPU-hour savings (savings). No torch: these run anywhere."""
