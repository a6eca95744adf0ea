"""Request-level deduplication for large recommendation models."""
