"""The wire models: a Smartcar delivery as sent, read tolerantly.

Smartcar's documentation and its real deliveries disagree on the VEHICLE_STATE shape (the real
ones are kept in ``tests/fixtures/captured/``): triggers sit in ``data.triggers`` as
``{code, name, group}`` or at the top level as ``{type, signal}`` where ``signal`` is an object or
a ``"Group.Name"`` string; signal times come as ``retrievedAt`` or ``fetchedAt``; ``meta``,
``triggers`` and per-signal ``status`` may be missing. These models accept all of these and
ignore unknown fields; :mod:`core.events.normalise` folds them into the internal form.

Ids are JSON strings only (a number is a schema failure, never coerced into a different string).
Times and the model year are typed ``Any`` here and read by :mod:`core.timestamps`, which turns
anything unreadable into None.

:data:`EDGE_VALIDATOR` is the web edge's reading of these same models: their own validation
schema, pruned of what the edge never reads (see :func:`edge_schema`).
"""

from __future__ import annotations

from typing import Annotated, Any, cast

from pydantic import BaseModel, ConfigDict, Field, StrictStr, StringConstraints
from pydantic_core import CoreSchema, SchemaValidator
from pydantic_core import core_schema as cs

VERIFY = "VERIFY"
VEHICLE_STATE = "VEHICLE_STATE"
VEHICLE_ERROR = "VEHICLE_ERROR"
VEHICLE_EVENT_TYPES = frozenset({VEHICLE_STATE, VEHICLE_ERROR})

#: A Smartcar id that is not free text: a JSON string, never a number coerced into one.
SmartcarId = Annotated[StrictStr, Field(min_length=1, max_length=255)]
#: Smartcar vehicle ids are UUIDs. The id becomes a URL path segment (``/vehicles/{id}``), so
#: nothing that could move the path (``.``, ``..``, ``/``, ``%``) is ever accepted.
VEHICLE_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
VehicleId = Annotated[StrictStr, StringConstraints(pattern=VEHICLE_ID_PATTERN)]


def is_legacy(version: object, event_name: object, payload: object) -> bool:
    """True for the top-level keys of a v2.0 webhook.

    v2.0 webhooks carry a top-level ``version`` (and ``eventName`` with ``payload``) where v3
    has ``meta.version``. The dict check of the step-by-step path and the one-pass check share it.
    """
    return version is not None or (event_name is not None and payload is not None)


class Wire(BaseModel):
    """Base of the wire models: unknown fields ignored.

    Descriptive text (make, model, signal names) accepts numbers, which is harmless; every id is
    a strict string (:data:`SmartcarId`, :data:`VehicleId`), so a numeric id is a schema failure
    at the edge and in the worker alike.
    """

    model_config = ConfigDict(extra="ignore", frozen=True, coerce_numbers_to_str=True)


class WireSignalRef(Wire):
    code: str | None = None
    name: str | None = None
    group: str | None = None


class WireStatus(Wire):
    value: str | None = None
    error: dict[str, Any] | None = None


class WireSignalMeta(Wire):
    oemUpdatedAt: Any = None
    retrievedAt: Any = None
    fetchedAt: Any = None


class WireSignal(WireSignalRef):
    body: Any = None
    meta: WireSignalMeta | None = None
    status: WireStatus | None = None


class WireTrigger(Wire):
    type: str | None = None
    code: str | None = None
    name: str | None = None
    group: str | None = None
    signal: WireSignalRef | str | None = None


class WireVehicle(Wire):
    id: VehicleId | None = None
    make: str | None = None
    model: str | None = None
    year: Any = None
    mode: str | None = None
    powertrainType: str | None = None


class WireUser(Wire):
    id: SmartcarId


class WireResolution(Wire):
    type: str | None = None


class WireVehicleError(Wire):
    type: str | None = None
    code: str | None = None
    state: str | None = None
    description: str | None = None
    suggestedUserMessage: str | None = None
    docURL: str | None = None
    resolution: WireResolution | None = None
    signals: list[WireSignalRef | str] | None = None


class WireData(Wire):
    user: WireUser
    vehicle: WireVehicle | None = None
    signals: list[WireSignal] | None = None
    triggers: list[WireTrigger | str] | None = None
    errors: list[WireVehicleError] | None = None


class WireMeta(Wire):
    version: str | None = None
    deliveryId: StrictStr | None = None
    deliveredAt: Any = None
    webhookId: StrictStr | None = None
    webhookName: str | None = None
    mode: str | None = None


class WireEnvelope(Wire):
    """A VEHICLE_STATE or VEHICLE_ERROR delivery; the event type itself is checked afterwards."""

    eventId: SmartcarId
    eventType: StrictStr
    vehicleId: VehicleId | None = None
    data: WireData
    triggers: list[WireTrigger | str] | None = None
    meta: WireMeta | None = None

    @property
    def vehicle_id(self) -> str | None:
        """``data.vehicle.id``, else the top-level ``vehicleId``; None when neither is given."""
        return (self.data.vehicle.id if self.data.vehicle else None) or self.vehicleId or None


class WebEnvelope(WireEnvelope):
    """The envelope plus the top-level keys that mark a legacy v2.0 webhook.

    The one-pass reading of a body (edge and worker) validates this model, so a legacy body is
    recognised without a second parse.
    """

    version: Any = None
    eventName: Any = None
    payload: Any = None

    @property
    def legacy(self) -> bool:
        return is_legacy(self.version, self.eventName, self.payload)


class WireVerifyData(Wire):
    challenge: str = Field(min_length=1)


class WireVerify(Wire):
    data: WireVerifyData


# ---------------------------------------------------------------------------------------------
# The edge's validator: the same schema, without the Python objects the edge never reads.

#: The ``Any`` fields the edge reads (``(model, field)``); every other ``Any`` field is left out.
_EDGE_READS = {
    (WireMeta, "deliveredAt"),
    (WebEnvelope, "version"),
    (WebEnvelope, "eventName"),
    (WebEnvelope, "payload"),
}


def edge_schema(schema: CoreSchema) -> CoreSchema | None:
    """``schema`` (a wire model's own validation schema) pruned for the web edge; None when it
    accepts every value.

    It accepts exactly the JSON documents ``schema`` accepts, and builds far fewer Python objects:

    * a model becomes a typed dict with the same fields and config (the same checks on the same
      keys, but a plain dict instead of a model instance);
    * a field that accepts any value is left out (it can never fail, so nothing is lost), unless
      the edge reads it (:data:`_EDGE_READS`): a signal's ``body`` and times are not even turned
      into Python objects;
    * ``dict[str, Any]`` becomes "any JSON object" (a typed dict without fields), which accepts
      the same values without building their contents.

    Every other schema (strings with their strictness, patterns and lengths, lists, unions,
    nullables) is kept as it is, so a value fails here exactly when it fails in the model.
    """
    kind = schema["type"]
    if kind == "any":
        return None
    if kind == "model":
        model = cast(cs.ModelSchema, schema)
        fields_schema = cast(cs.ModelFieldsSchema, model["schema"])
        fields: dict[str, cs.TypedDictField] = {}
        for name, field in fields_schema["fields"].items():
            inner = field["schema"]
            required = inner["type"] != "default"
            if not required:
                inner = cast(cs.WithDefaultSchema, inner)["schema"]
            pruned = inner if (model["cls"], name) in _EDGE_READS else edge_schema(inner)
            if pruned is not None:
                fields[name] = cs.typed_dict_field(pruned, required=required)
        return cs.typed_dict_schema(fields, config=model.get("config"), extra_behavior="ignore")
    if kind == "nullable":
        nullable = edge_schema(cast(cs.NullableSchema, schema)["schema"])
        return None if nullable is None else cs.nullable_schema(nullable)
    if kind == "list":
        items = cast(cs.ListSchema, schema).get("items_schema")
        return cs.list_schema(None if items is None else edge_schema(items))
    if kind == "union":
        choices = [c[0] if isinstance(c, tuple) else c for c in cast(cs.UnionSchema, schema)["choices"]]
        pruned_choices = [edge_schema(choice) for choice in choices]
        if any(choice is None for choice in pruned_choices):
            return None
        return cs.union_schema([choice for choice in pruned_choices if choice is not None])
    if kind == "dict":
        mapping = cast(cs.DictSchema, schema)
        keys, values = mapping.get("keys_schema"), mapping.get("values_schema")
        if (keys is None or keys == {"type": "str"}) and (values is None or values["type"] == "any"):
            # JSON object keys are always strings: any object is accepted, its contents unread.
            return cs.typed_dict_schema({}, extra_behavior="ignore")
    return schema


#: Validates a delivery body (JSON bytes) as :class:`WebEnvelope` does, into plain dicts holding
#: only what the edge reads and the fields a check produces: ids, types, texts, ``meta``.
EDGE_VALIDATOR = SchemaValidator(cast(CoreSchema, edge_schema(WebEnvelope.__pydantic_core_schema__)))
