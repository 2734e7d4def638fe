"""The networks: the scan core (lax reference + Pallas kernels), the µLM, the match model."""
