"""The statistics of certification, NumPy/SciPy only: fixed-n CERTIFY and PREDICT
(`smoothing`), anytime-valid confidence sequences, and sequential decisions on top of them."""
