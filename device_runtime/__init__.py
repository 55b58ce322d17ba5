"""The device side (installs as ``fedspine_jax.device_runtime``).

* ``agent`` -- the device agent of the real deployment: a gRPC client that fetches its
  round task from the server, runs the simulator's ``train.local_round`` on its local data
  and uploads the update (``fedspine device``, module ``cli``) and, once the run is over, fetches its exported model and builds its TensorRT engine
  (``fedspine device --fetch-model``);
* ``inference`` -- the on-device inference runtime for exported models (TensorRT / ONNX
  Runtime / JAX back ends, tokenisation, batching, greedy decoding with a KV cache;
  ``fedspine infer``, module ``infer_cli``).
"""
