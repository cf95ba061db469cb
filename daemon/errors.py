"""Errors of the service layer (kept free of heavy imports so the CLI starts fast)."""


class ServiceError(Exception):
    """An operation cannot be done as asked; the message says why and what to do instead."""
