"""Smartcar webhook payloads: the wire schema (``wire``), the normalised event (``model``), wire →
model (``normalise``) and a body → the model, at the edge and in the worker (``parse``)."""
