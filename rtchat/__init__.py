"""rtchat: a real-time chat server. Server-Sent Events out, plain POSTs in, Redis between nodes."""

__version__ = "0.1.0"
