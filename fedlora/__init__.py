"""fedlora: federated fine-tuning of transformers with LoRA-family adapters on Flower."""

__version__ = "0.1.0"
