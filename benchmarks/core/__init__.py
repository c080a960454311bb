"""What every benchmark task shares; nothing here knows captions or images."""
