"""The Ray Data pipeline: read Parquet, decode and preprocess on CPU actors, generate on GPU
actors, write labels + stats to Parquet, resumable, one output row per input id."""
