"""llmgate: a streaming LLM API gateway built on Twisted."""

__version__ = "0.1.0"
