"""FedSpine-JAX: federated LoRA fine-tuning with adaptive structured pruning.

The core library: pure JAX/Flax NNX, no networking and no deployment file formats.
"""

__version__ = "0.1.0"
