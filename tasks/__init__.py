"""Prefect tasks: the one task that runs a stage of the ``salient`` library, and the Ray executor it runs on."""
