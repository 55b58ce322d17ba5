"""The shipped experiment configs (package data): ``fedspine simulate tiny`` finds
``tiny.yaml`` here wherever the package is installed (``fedspine_jax.config.config_path``)."""
