"""micromoe: MoE training with fine-grained per-micro-batch load balancing (MicroEP)."""

__version__ = "0.1.0"
