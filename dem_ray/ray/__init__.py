"""The Ray layer: fine-tunes on Ray Train, evaluator actors, their pool and dispatch, the search.

A thin orchestration over `dem_ray.core`; stages call it, it calls nothing above it.
"""
