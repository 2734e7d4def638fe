"""Pallas kernels of streamlearn, installed as `streamlearn.kernels`."""
