"""degraded: the canned answer streamed instead of the model's while the breaker is open or the switch is on."""
from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_MESSAGE = ("抱歉，法律小助手现在繁忙，暂时无法回答您的问题。请稍后再试；如需尽快得到帮助，"
                   "请咨询执业律师，或拨打12348公共法律服务热线（法律援助）。")


@dataclass
class DegradedConfig:
    message: str = DEFAULT_MESSAGE    # the canned answer; say the assistant is busy and where to get human help
    proxy_attempts: int = 3           # behind Envoy (x-envoy-attempt-count): attempts before this one get
                                      # UNAVAILABLE instead, so the proxy retries a healthy replica; 0 = off

    def validate(self) -> None:
        if not self.message.strip():
            raise ValueError("degraded.message must not be empty")
        if self.proxy_attempts < 0:
            raise ValueError("degraded.proxy_attempts must be >= 0")


def proxy_can_retry(metadata, proxy_attempts: int) -> bool:
    """Whether the balancer in front (Envoy's x-envoy-attempt-count) will try another replica if this one says
    UNAVAILABLE: its attempt number is below the last one it makes."""
    for key, value in metadata or ():
        if key == "x-envoy-attempt-count" and isinstance(value, str) and value.isdigit():
            return int(value) < proxy_attempts
    return False


def canned_deltas(message: str) -> list[str]:
    """The message cut after each sentence or clause mark, so it streams like an answer."""
    parts = [p for p in re.split(r"(?<=[，。；！？,.;!?])", message) if p]
    return parts or [message]
