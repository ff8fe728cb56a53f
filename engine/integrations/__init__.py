"""Integrations of walsync with other frameworks, each in a module of its own that
imports its framework (an optional extra), so that the engine never does.

- ``langgraph``: a LangGraph checkpointer on a store (the ``walsync-store[langgraph]``
  extra).
"""

__all__: list[str] = []
