"""Request-level (ROO) data: schemas, Parquet I/O, converters, generators and batches."""
