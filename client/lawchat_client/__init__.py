"""lawchat-client: Python SDK and CLI for the lawchat legal assistant server."""
from .client import ChatResult, ChatStream, LawchatClient, LawchatError

__all__ = ["ChatResult", "ChatStream", "LawchatClient", "LawchatError"]
__version__ = "0.1.0"
