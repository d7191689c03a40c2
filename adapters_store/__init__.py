"""The adapter store: PEFT format, validation against the served base model, durable storage.

Never imports ``server``.
"""
