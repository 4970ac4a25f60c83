"""numba kernels for the window search: summed-area tables and best-window search."""
