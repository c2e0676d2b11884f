"""The Ray layer: fine-tunes on Ray Train, evaluator actors and their pool, the Tune search.

A thin orchestration over `dem_ray.core`; stages call it, it calls nothing above it.
"""
