"""Benchmarks (long measurements, not tests): speed/MFU, model quality across datasets, Kunlun ablations."""
