"""A run of the main job: opening or resuming it, the loop, the safety net, rollback, canaries."""
