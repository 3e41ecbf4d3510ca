"""Data: importers for each on-disk format, phantoms, the shard writer and the loaders."""
