"""fibecfed: federated LoRA fine-tuning with Fisher-information curricula (FibecFed)."""

__version__ = "0.1.0"
