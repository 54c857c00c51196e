"""Alembic migrations for the user store; run them with ``smartcar-ingest db upgrade`` (see core.store.db)."""
