"""gafh_fast: distributed, high-throughput training and inference for GAFH-RIDN face hallucination."""
__version__ = "0.1.0"
