"""Workspaces: owners, members and the agent configuration."""
