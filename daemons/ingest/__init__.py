"""ingest: ``file.ready`` -> verified copy on the first disk endpoint, registered in the catalogue."""
