"""The JSON request bodies of /api/v1, declared once each: the route validates its body against the
declaration (``search.edge.parse``) and the OpenAPI document publishes the same declaration's JSON Schema
(``search.openapi``), so what a client reads is what the server checks. pydantic, strict: a JSON string is
never taken for a number, nor a boolean for an integer; a field the declaration lacks is refused."""
from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from indexer.errors import InvalidInputError
from indexer.storage.tables import MAX_LABEL, MAX_REASON
from search.service import MAX_K, SCOPES

MAX_ID = 2**63 - 1
Id = Annotated[int, Field(ge=1, le=MAX_ID)]
Similarity = Annotated[float, Field(ge=-1.0, le=1.0)]


def _no_default(schema: dict[str, Any]) -> None:
    schema.pop("default", None)


def absent(description: str | None = None) -> Any:
    """A field a client may leave out but never send as null."""
    return Field(None, description=description, json_schema_extra=_no_default)


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    # the error code of a field's problem where it is not ``bad_parameter`` (the JSON API's codes predate these)
    error_codes: ClassVar[dict[str, str]] = {}


class FlagBody(Body):
    """POST /images/{id}/flag and /unflag: why, and under which policy label (unflagging needs a reason)."""
    reason: Annotated[str, StringConstraints(max_length=MAX_REASON)] | None = None
    label: Annotated[str, StringConstraints(max_length=MAX_LABEL)] | None = None


class DeleteBody(Body):
    """DELETE /images/{id}: why (required, not blank)."""
    error_codes: ClassVar[dict[str, str]] = {"reason": "reason_required"}
    reason: Annotated[str, StringConstraints(min_length=1, max_length=MAX_REASON, pattern=r"\S")]


class SweepBody(Body):
    """POST /sweep: seeds, and how alike and how many."""
    ids: Annotated[list[Id], Field(min_length=1, max_length=200)]
    min_similarity: Similarity = absent("default: suggested from the seeds (the 10th percentile of each seed's "
                                        "similarity to its nearest fellow seed)")
    per_seed: Annotated[int, Field(ge=1, le=MAX_K)] = 30
    limit: Annotated[int, Field(ge=1, le=10_000)] = 200


class ClusterDecisionBody(Body):
    """POST /clusters/{id}/decision: confirm or dismiss, with a reason code from the team's list."""
    error_codes: ClassVar[dict[str, str]] = {"reason_code": "reason_required"}
    status: Literal["confirmed", "dismissed"]
    reason_code: Annotated[str, StringConstraints(min_length=1, max_length=MAX_LABEL)]
    name: Annotated[str, StringConstraints(max_length=MAX_LABEL)] | None = None
    label: Annotated[str, StringConstraints(max_length=MAX_LABEL)] | None = None
    note: Annotated[str, StringConstraints(max_length=MAX_REASON)] | None = None


class SearchByStored(Body):
    """POST /search with JSON: stored images by id, ids or sha256 (every field given is checked)."""
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True,
                              json_schema_extra={"anyOf": [{"required": ["id"]}, {"required": ["ids"]},
                                                           {"required": ["sha256"]}]})
    id: Id = absent()
    ids: Annotated[list[Id], Field(min_length=1, max_length=100)] = absent()
    sha256: Annotated[str, StringConstraints(pattern=r"^[0-9a-fA-F]{64}$")] = absent()
    k: Annotated[int, Field(ge=1, le=MAX_K)] = 10
    scope: Literal[SCOPES] = "flagged"  # type: ignore[valid-type]
    min_similarity: Similarity = -1.0

    @model_validator(mode="before")
    @classmethod
    def _names_a_query(cls, data: Any) -> Any:
        if isinstance(data, dict) and not any(data.get(k) is not None for k in ("id", "ids", "sha256")):
            raise InvalidInputError("give 'id', 'ids' or 'sha256' (or upload an image as multipart)",
                                    code="missing_query")
        return data


BODIES: tuple[type[Body], ...] = (FlagBody, DeleteBody, SweepBody, ClusterDecisionBody, SearchByStored)


def json_schemas() -> dict[str, Any]:
    """Every declaration's JSON Schema, by name, for the OpenAPI document's components."""
    out: dict[str, Any] = {}
    for model in BODIES:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        out.update(schema.pop("$defs", {}))
        out[model.__name__] = schema
    return out
