"""Chats: the /chat blueprint, the chat service and (later) the Socket.IO namespace."""
