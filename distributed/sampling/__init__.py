"""Flow-matching schedules and samplers."""
