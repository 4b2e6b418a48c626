"""The OpenAPI 3.1 description of the query API (``/api/v1/openapi.json``), written as data.

Kept beside the routes (``daemons.monitor.api``); a test holds the two to the same paths and
parameters, so the description cannot drift from what is served.
"""

from __future__ import annotations

from typing import Any

from common import __version__
from daemons.monitor.api_params import DEFAULT_LIMIT, MAX_DEPTH, MAX_LIMIT, MAX_NAMES


def _param(
    name: str, description: str, *, required: bool = False, where: str = "query", **schema: Any
) -> dict[str, Any]:
    return {
        "name": name,
        "in": where,
        "required": required,
        "description": description,
        "schema": {"type": "string", **schema},
    }


def _names(description: str) -> dict[str, Any]:
    return {
        "name": "name",
        "in": "query",
        "required": True,
        "description": description,
        "style": "form",
        "explode": True,
        "schema": {
            "type": "array",
            "minItems": 1,
            "maxItems": MAX_NAMES,
            "items": {"type": "string", "minLength": 1, "maxLength": 1024},
        },
    }


LIMIT = _param(
    "limit", f"Items per page (default {DEFAULT_LIMIT}).", type="integer", minimum=1, maximum=MAX_LIMIT
)
NEXT = _param("next", "The `next` cursor of the previous page (opaque).", maxLength=2048)
NAME = _param("name", "A logical file name.", required=True, minLength=1, maxLength=1024)
PATH = _param("path", "A directory of logical names ('' or absent: the top).", maxLength=1024)
DEPTH = _param("depth", "Generations to walk.", type="integer", minimum=1, maximum=MAX_DEPTH)

_ERROR = {
    "type": "object",
    "properties": {
        "error": {
            "type": "object",
            "properties": {"parameter": {"type": ["string", "null"]}, "message": {"type": "string"}},
        }
    },
}
_PAGE = {
    "type": "object",
    "required": ["items", "next"],
    "properties": {
        "items": {"type": "array", "items": {"type": "object"}},
        "next": {"type": ["string", "null"]},
    },
}


def _get(summary: str, dirac: str, params: list[dict[str, Any]], body: dict[str, Any]) -> dict[str, Any]:
    json_of = {"content": {"application/json": {"schema": body}}}
    err = {"content": {"application/json": {"schema": _ERROR}}}
    return {
        "get": {
            "summary": summary,
            "description": f"DIRAC: `{dirac}`." if dirac else summary,
            "parameters": params,
            "responses": {
                "200": {"description": "The answer.", **json_of},
                "400": {"description": "A parameter is refused (named in the error).", **err},
                "401": {"description": "The monitor's token is missing or wrong."},
                "404": {"description": "A name the catalogue does not hold.", **err},
                "503": {"description": "The catalogue cannot be reached.", **err},
            },
        }
    }


PATHS: dict[str, dict[str, Any]] = {
    "/files": _get(
        "A file's metadata, provenance, replicas and last error.",
        "getFileMetadata",
        [NAME],
        {"type": "object"},
    ),
    "/replicas": _get(
        "The replicas of up to 100 files.", "getReplicas", [_names("Logical names.")], {"type": "object"}
    ),
    "/exists": _get(
        "Whether each name is a file and / or a directory.",
        "exists, isFile, isDirectory",
        [_names("Logical names or directories.")],
        {"type": "object"},
    ),
    "/find": _get(
        "Files whose metadata satisfy every filter, by name.",
        "findFilesByMetadata",
        [
            _param(
                "filter",
                "A condition as `spool find` takes it (run>=12000, telescope=LST1,LST2); all must hold.",
                maxLength=4096,
            ),
            _param("dataset", "Only files of this dataset.", maxLength=255),
            LIMIT,
            NEXT,
        ],
        _PAGE,
    ),
    "/datasets": _get("Datasets with their files and bytes, by name.", "", [LIMIT, NEXT], _PAGE),
    "/directory": _get("The entries right under a directory.", "listDirectory", [PATH, LIMIT, NEXT], _PAGE),
    "/directory/size": _get(
        "Files and bytes under a directory, and their copies per endpoint.",
        "getDirectorySize, getDirectoryReplicas",
        [PATH],
        {"type": "object"},
    ),
    "/lfn": _get(
        "The logical name of a physical path or URL on an endpoint.",
        "getLFNForPFN",
        [
            _param("endpoint", "An endpoint name.", required=True, maxLength=64),
            _param(
                "pfn",
                "A path or URL on the endpoint, or its path below the endpoint's root.",
                required=True,
                maxLength=4096,
            ),
        ],
        {"type": "object"},
    ),
    "/endpoints": _get("The storage endpoints, their kind and states.", "getStorageElements", [], _PAGE),
    "/endpoints/{endpoint}/dump": _get(
        "Every replica on an endpoint: name, pfn, size, adler32, state.",
        "",
        [_param("endpoint", "An endpoint name.", required=True, where="path", maxLength=64), LIMIT, NEXT],
        _PAGE,
    ),
    "/ancestors": _get(
        "Ancestors of a file, nearest first.", "getFileAncestors", [NAME, DEPTH, LIMIT, NEXT], _PAGE
    ),
    "/descendants": _get(
        "Descendants of a file, nearest first.", "getFileDescendents", [NAME, DEPTH, LIMIT, NEXT], _PAGE
    ),
    "/metadata/fields": _get("The metadata keys in use.", "getMetadataFields", [], _PAGE),
}


def document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Spool catalogue query API",
            "version": __version__,
            "description": "Read-only questions to the Spool catalogue (docs/client.md, docs/dirac.md).",
        },
        "servers": [{"url": "/api/v1"}],
        "components": {"securitySchemes": {"token": {"type": "http", "scheme": "bearer"}}},
        "security": [{"token": []}],
        "paths": PATHS,
    }
