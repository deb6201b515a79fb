"""fastkv's engine: question answering over long documents with a compressed (FastKV) prefill."""

__version__ = "0.1.0"
