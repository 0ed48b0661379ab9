"""Digit arithmetic shared by the character-level tasks (`_tasks`) and the chat tasks (`_chat_tasks`)."""
from __future__ import annotations


def count_carries(a: int, b: int) -> int:
    """Carries in the column addition of a + b (digit by digit, from the right)."""
    carries, carry, x, y = 0, 0, a, b
    while x or y:
        carry = int(x % 10 + y % 10 + carry >= 10)
        carries += carry
        x, y = x // 10, y // 10
    return carries
