"""Torch model implementations (one file per family); chosen through `aiosched.executors.model_registry`."""
