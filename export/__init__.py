"""export package (installs as fedspine_jax.export)."""
