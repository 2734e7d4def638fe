"""What a run keeps on disk: versions (Orbax), the registry, the run directory, int8 artifacts."""
