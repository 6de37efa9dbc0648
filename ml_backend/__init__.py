"""Label Studio ML backend for attention tasks (see the project README)."""
