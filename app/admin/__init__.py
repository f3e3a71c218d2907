"""Operators: the admin API and the command line."""
