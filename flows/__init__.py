"""Prefect flows: the rebuild, which walks the stage registry; every command runs it."""
