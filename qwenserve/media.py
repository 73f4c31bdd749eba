"""Images and videos in messages (placeholder until the media issue lands)."""

from __future__ import annotations

from .config import Settings
from .protocol import bad_request


class MediaLoader:
    def __init__(self, settings: Settings):
        self.settings = settings

    async def load(self, request):
        for i, message in enumerate(request.messages):
            if isinstance(message.content, list):
                for j, part in enumerate(message.content):
                    if part["type"] not in ("text", "input_text"):
                        raise bad_request("media parts are not supported yet", f"messages[{i}].content[{j}]")
        return None
