"""Reading a request body once, capped: shared by the request middleware and capture.

No vLLM import here.
"""

from __future__ import annotations

from starlette.types import Message, Receive


async def read_capped(receive: Receive, cap: int) -> tuple[list[Message], bytes | None]:
    """Receive a request body of at most ``cap`` bytes, chunks joined once.

    Returns the messages received (to replay them) and the body, or None as the body when
    it is larger than ``cap``: then the messages hold only its start and the caller passes
    the request through without reading the rest.
    """
    messages: list[Message] = []
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            return messages, None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > cap:
            return messages, None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return messages, b"".join(chunks)
