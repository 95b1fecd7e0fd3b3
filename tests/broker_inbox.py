"""The ``deliver`` end of a broker under test: keeps what it is given."""

from __future__ import annotations

from rtchat.messages import Message


class Inbox:
    """The ``deliver`` callback: keeps every delivered message."""

    def __init__(self) -> None:
        self.messages: list[Message] = []

    def __call__(self, msg: Message) -> None:
        self.messages.append(msg)

    def ids(self, room: str) -> list[str]:
        return [m.id for m in self.messages if m.room == room]
