"""Executors: where model steps run. The engine reaches them only through `base`."""
