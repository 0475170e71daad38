"""Prefect flows: the stages of a Salient build, orchestrated."""
