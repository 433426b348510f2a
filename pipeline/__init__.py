"""dsmooth's library: certification maths, models, data, objectives and storage.

Plain PyTorch/NumPy: nothing here imports Ray, so the engine runs (and is benchmarked)
on machines without it.
"""
