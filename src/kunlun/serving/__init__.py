"""Serving a trained model: ``export`` writes one self-contained package (a ``torch.export``'ed program, compiled
with AOTInductor where that works, plus the run's encoder and schema); ``server`` scores raw JSON requests over
HTTP with micro-batching; ``examples`` turns request examples into the raw columns the training encoder reads.
"""
