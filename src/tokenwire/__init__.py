"""tokenwire: an OpenAI-compatible LLM gateway built for real-time token streaming."""

__version__ = "0.1.0"
