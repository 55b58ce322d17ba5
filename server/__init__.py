"""server package (installs as fedspine_jax.server)."""
