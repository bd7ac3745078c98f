"""Parallel mechanics: the mesh, USP attention, sequence sharding, local rank spawning."""
