"""Swarms: N learners stacked on a member axis in one vmapped step, and population-based training."""
