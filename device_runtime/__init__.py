"""device_runtime package (installs as fedspine_jax.device_runtime)."""
