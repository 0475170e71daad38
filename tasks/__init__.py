"""Prefect tasks: thin wrappers that call the ``salient`` library, and the Ray actor pool they share."""
