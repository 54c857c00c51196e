"""Smartcar webhook payloads: :mod:`~core.events.wire` (what Smartcar sends, read tolerantly),
:mod:`~core.events.model` (the one form the rest of the code sees), :mod:`~core.events.normalise`
(wire → model) and :mod:`~core.events.parse` (a body → the models, at the edge and in the worker).
"""
