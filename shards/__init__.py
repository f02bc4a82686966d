"""Shards: HD-VILA clips → webdataset shards → streaming training batches."""
