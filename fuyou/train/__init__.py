"""Training: the in-memory reference trainer, schedules, metrics, run directories and the loop."""
