"""lawchat-client: Python SDK (sync and asyncio) and CLI for the lawchat legal assistant server."""
from .aio import AsyncChatStream, AsyncLawchatClient
from .client import ChatStream, LawchatClient
from .messages import ChatOptions, ChatResult
from .retry import NO_RETRY, LawchatError, RetryPolicy

__all__ = ["AsyncChatStream", "AsyncLawchatClient", "ChatOptions", "ChatResult", "ChatStream", "LawchatClient",
           "LawchatError", "NO_RETRY", "RetryPolicy"]
__version__ = "0.2.0"
