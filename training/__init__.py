"""Offline fitting of the learned parts and tuning of the defaults, on ../shared/eval.

training.fit_readout writes the shipped read-out weights (engines/readout_weights.npz) with
the window-choice term of training.fit_window; training.tune and training.composition choose
search settings by cross-validation. Reports go to training/results/. training.data holds what
these share with the benchmarks (bench/ imports it; nothing here imports bench/). Not part of
the installed package.
"""
