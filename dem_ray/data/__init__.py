"""Datasets: readers of jsonl/json/parquet/text/saved HF dirs, packing, package corpora."""
