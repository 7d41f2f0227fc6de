"""The platform layer: configs, the CLI, Ray Tune sweeps and MLflow tracking.

It drives the pipelines (``gradgym.pipelines``) and never the other way around.
"""
