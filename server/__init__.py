"""mergeserve: merge LoRA adapters into a base model at boot and serve it with TGI's API."""

__version__ = "0.1.0"
