"""A run directory: its layout, manifest, storage (local or bucket), lock and trial log."""
