"""edgepeft: train, export, benchmark and ship quantized LoRA adapters for edge devices."""

__version__ = "0.1.0"
