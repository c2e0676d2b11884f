"""Pure torch and arithmetic: safetensors I/O, vectors, merges, perplexity, spaces, cost.

Nothing here imports Ray, the stages or the run directory; everything above builds on it.
"""
