"""Self-hostable gateway for the OpenAI Images API."""

__version__ = "0.2.0"
