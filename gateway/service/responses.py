"""Stored responses: what `POST /v1/responses` made with `store: true`, kept so that a later
request can continue from it (`previous_response_id`) and a client can read it again or delete
it. Each row holds the response object and every input item of its prompt, its predecessors'
included, so continuing a conversation is one lookup. Rows are pruned by age and count
(MLX_MANAGER_RESPONSE_RETENTION) as new ones are written, as the request log is.

The service stores what the face made without reading it, but for the ids of input items
(pagination): the shape of a response is the face's business."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Literal

from config.settings import Settings
from config.store import Store, timestamp
from gateway.errors import InvalidRequest, NotFound

MAX_ITEMS_PAGE = 100


@dataclass
class StoredResponse:
    response: dict[str, Any]
    input_items: list[dict[str, Any]]


class StoredResponses:
    def __init__(self, store: Store, settings: Settings) -> None:
        self.store = store
        self.max_age, self.max_rows = settings.response_limits

    @property
    def enabled(self) -> bool:
        return self.max_rows != 0

    def _bounds(self) -> tuple[str | None, int | None]:
        return timestamp(time.time() - self.max_age) if self.max_age else None, self.max_rows

    def save(
        self, response: dict[str, Any], input_items: list[dict[str, Any]], key_name: str | None
    ) -> None:
        """Keep a response (unless retention is 0), pruning older ones in the same write."""
        if not self.enabled:
            return
        row = {
            "id": response["id"],
            "time": timestamp(time.time()),
            "key_name": key_name,
            "response": json.dumps(response, ensure_ascii=False),
            "input_items": json.dumps(input_items, ensure_ascii=False),
        }
        self.store.save_response(row, *self._bounds())

    def get(
        self, response_id: str, key_name: str | None, param: str | None = None
    ) -> StoredResponse:
        """A stored response, if the key that asks is the key that made it; 404 otherwise (a
        response of another key is not said to exist). Expired rows count as gone even
        before a write prunes them."""
        row = self.store.response(response_id)
        before, _ = self._bounds()
        if (
            row is None
            or row["key_name"] != key_name
            or not self.enabled
            or (before is not None and row["time"] < before)
        ):
            what = "Previous response" if param == "previous_response_id" else "Response"
            raise NotFound(
                f"{what} with id '{response_id}' not found. Only responses made with "
                "`store: true` are kept (for MLX_MANAGER_RESPONSE_RETENTION), and only the "
                "API key that made one can read it.",
                param=param,
                code="previous_response_not_found" if param else None,
            )
        return StoredResponse(json.loads(row["response"]), json.loads(row["input_items"]))

    def delete(self, response_id: str, key_name: str | None) -> None:
        self.get(response_id, key_name)  # 404 unless this key may see it
        self.store.delete_response(response_id)

    def input_items(
        self,
        response_id: str,
        key_name: str | None,
        limit: int = 20,
        order: Literal["asc", "desc"] = "desc",
        after: str | None = None,
    ) -> tuple[list[dict[str, Any]], bool]:
        """One page of a response's input items, in `order`, after the item `after`; and
        whether more follow."""
        if not 1 <= limit <= MAX_ITEMS_PAGE:
            raise InvalidRequest(f"limit must be from 1 to {MAX_ITEMS_PAGE}.", param="limit")
        items = self.get(response_id, key_name).input_items
        if order == "desc":
            items = items[::-1]
        if after is not None:
            ids = [i.get("id") for i in items]
            if after not in ids:
                raise InvalidRequest(
                    f"after: no input item '{after}' in response '{response_id}'.", param="after"
                )
            items = items[ids.index(after) + 1 :]
        return items[:limit], len(items) > limit

    def prune(self) -> int:
        """Delete rows beyond the retention (at startup: the age bound moves on while nothing
        is written; a retention of 0 deletes them all)."""
        return self.store.prune_responses(*self._bounds())
