"""Small shared helpers: image loading, crash-safe files, logging and distributed sharding."""
