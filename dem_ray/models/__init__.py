"""Base models: loading (HF dir, Hub id, GGUF), checks, and tiny models for tests and demos."""
