"""The gateway: thin asyncio shells (WebSocket and HTTP) around the protocol core."""
