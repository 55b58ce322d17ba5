"""The device side (installs as ``fedspine_jax.device_runtime``).

* ``agent`` -- the device agent of the real deployment: a gRPC client that fetches its
  round task from the server, runs the simulator's ``train.local_round`` on its local data
  and uploads the update (``fedspine device``, module ``cli``);
* the on-device inference runtime for exported models (TensorRT / ONNX Runtime / JAX
  back ends; ``fedspine infer``).
"""
