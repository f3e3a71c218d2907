"""The plain WebSocket endpoint /ws/chat, for clients without a Socket.IO library."""
