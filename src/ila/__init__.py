"""ila: find the layers of an LLM that matter for alignment (ILA, arXiv 2410.17875), then fine-tune only those."""

from ila.errors import IlaError

__all__ = ["IlaError"]
