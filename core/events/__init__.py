"""Smartcar webhook payloads: the ``wire`` schema, the normalised ``model``, ``normalise`` and ``parse``."""
