"""What the page changes and reads through the daemon: every change is a command on its queue (as a
panel button's or an MQTT message is) and the handler waits for the reply; the examples' pictures are
read with ``store.picture`` (safe from another thread); the examples' download and upload: ``transfer.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from edgeknn.commands import (
    MAX_EXAMPLES_PER_COMMAND,
    AddClass,
    AddExample,
    Command,
    DeleteExample,
    ForgetClass,
    ListExamples,
    RemoveClass,
    RenameClass,
    Result,
    SetThreshold,
)
from edgeknn.web.transfer import Transfers

REPLY_TIMEOUT_S = 30.0  # a command's reply (an added example waits for the next frame)


class Actions:
    """The request handlers that go through the daemon's queue (``submit``)."""

    def __init__(
        self,
        submit: Callable[[Command], None],
        picture: Callable[[int], bytes | None],
        store_path: Path,
        headers: dict[str, str] | None = None,
    ):
        self._submit, self._picture, self.store_path = submit, picture, Path(store_path)
        # the download and upload of the examples (an archive beside the store's file while it comes)
        self.transfers = Transfers(self._run, submit, self.store_path.parent, headers or {})

    def routes(self) -> list[web.RouteDef]:
        return self.transfers.routes() + [
            web.get("/api/examples", self.examples),
            web.get(r"/api/pictures/{id:\d+}.jpg", self.picture),
            web.post("/api/add-example", self.add_example),
            web.post("/api/delete-example", self.delete_example),
            web.post("/api/add-class", self.add_class),
            web.post("/api/rename-class", self.rename_class),
            web.post("/api/remove-class", self.remove_class),
            web.post("/api/forget-class", self.forget_class),
            web.post("/api/threshold", self.threshold),
        ]

    async def picture(self, request: web.Request) -> web.Response:
        jpeg = self._picture(int(request.match_info["id"]))
        if jpeg is None:
            return json_response({"ok": False, "error": "no such picture"}, 404)
        response = web.Response(body=jpeg, content_type="image/jpeg")
        response.headers["Cache-Control"] = "private, max-age=600"
        return response

    async def examples(self, request: web.Request) -> web.Response:
        """Every example (of ``class``), oldest first; with ``limit`` one page of them, newest first."""
        name = request.query.get("class")
        if "limit" not in request.query:
            return await self._command(ListExamples(class_name=name, source="web", reply=None))
        page = _page_of(request.query)
        if isinstance(page, str):
            return json_response({"ok": False, "error": page}, 400)
        result = await self._run(ListExamples(class_name=name, source="web"))
        if not result.ok:
            return self._answer(result)
        return json_response({"ok": True, **examples_page(result.detail["examples"], *page)})

    # --- what the page changes: commands on the daemon's queue ----------------------------------------

    async def add_example(self, request: web.Request) -> web.Response:
        body = await request_json(request)
        count = body.get("count", 1)
        if (
            isinstance(count, bool)
            or not isinstance(count, int)
            or not 1 <= count <= MAX_EXAMPLES_PER_COMMAND
        ):
            return json_response(
                {"ok": False, "error": f"count: expected an integer 1..{MAX_EXAMPLES_PER_COMMAND}"}, 400
            )
        return await self._command(AddExample(class_name=_text(body, "class"), count=count, source="web"))

    async def delete_example(self, request: web.Request) -> web.Response:
        body = await request_json(request)
        example = body.get("id")
        if isinstance(example, bool) or not isinstance(example, int):
            return json_response({"ok": False, "error": "id: expected an integer"}, 400)
        return await self._command(DeleteExample(example=example, source="web"))

    async def add_class(self, request: web.Request) -> web.Response:
        body = await request_json(request)
        return await self._command(AddClass(class_name=_text(body, "class"), source="web"))

    async def rename_class(self, request: web.Request) -> web.Response:
        body = await request_json(request)
        command = RenameClass(class_name=_text(body, "class"), new_name=_text(body, "new_name"), source="web")
        return await self._command(command)

    async def remove_class(self, request: web.Request) -> web.Response:
        body = await request_json(request)
        return await self._command(RemoveClass(class_name=_text(body, "class"), source="web"))

    async def forget_class(self, request: web.Request) -> web.Response:
        """Clear a class: its examples go, the class keeps its name and slot (button and LED)."""
        body = await request_json(request)
        return await self._command(ForgetClass(class_name=_text(body, "class"), source="web"))

    async def threshold(self, request: web.Request) -> web.Response:
        body = await request_json(request)
        value = body.get("value")
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int | float) or not -1.0 <= value <= 1.0
        ):
            return json_response(
                {"ok": False, "error": "value: expected a number -1..1, or null for automatic"}, 400
            )
        return await self._command(SetThreshold(value=None if value is None else float(value), source="web"))

    async def _run(self, command: Command) -> Result:
        """Put ``command`` on the daemon's queue and wait for its reply (on this thread)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Result] = loop.create_future()

        def reply(result: Result) -> None:  # the main loop's thread
            def settle() -> None:
                if not future.done():
                    future.set_result(result)

            with contextlib.suppress(RuntimeError):  # the page was closed meanwhile
                loop.call_soon_threadsafe(settle)

        object.__setattr__(command, "reply", reply)  # frozen dataclass: set before it is queued
        self._submit(command)
        try:
            return await asyncio.wait_for(future, REPLY_TIMEOUT_S)
        except TimeoutError:
            return Result(False, f"no reply from the device within {REPLY_TIMEOUT_S:g} s")

    async def _command(self, command: Command) -> web.Response:
        return self._answer(await self._run(command))

    def _answer(self, result: Result) -> web.Response:
        status = 200 if result.ok else 503 if result.error.startswith(("busy:", "no reply")) else 400
        return json_response({"ok": result.ok, "error": result.error, **result.detail}, status)


class BadRequest(web.HTTPBadRequest):
    def __init__(self, error: str):
        super().__init__(text=json.dumps({"ok": False, "error": error}), content_type="application/json")


async def request_json(request: web.Request) -> dict:
    """The request's JSON object; anything else is a 400 with one line."""
    if request.content_type != "application/json":
        raise BadRequest("expected a JSON body (Content-Type: application/json)")
    try:
        body = await request.json()
    except ValueError as e:
        raise BadRequest(f"not JSON: {e}") from None
    except RecursionError:
        raise BadRequest("not JSON: nested too deeply") from None
    if not isinstance(body, dict):
        raise BadRequest("expected a JSON object")
    return body


MAX_PAGE = 200  # examples per page of the page's example browser, at most


def _page_of(query: Any) -> tuple[int, int] | str:
    """(offset, limit) from a query's ``offset`` and ``limit``, or why they are wrong (one line)."""
    try:
        offset, limit = int(query.get("offset", "0")), int(query["limit"])
    except ValueError:
        return f"offset, limit: expected integers (limit 1..{MAX_PAGE})"
    if offset < 0 or not 1 <= limit <= MAX_PAGE:
        return f"offset, limit: expected offset >= 0 and limit 1..{MAX_PAGE}"
    return offset, limit


def examples_page(examples: list[dict], offset: int, limit: int) -> dict:
    """One page of ``examples`` (oldest first as listed), newest first: the page's example browser
    shows the newest on its first page, and ``total`` says how many pages there are."""
    newest = examples[::-1]
    return {"examples": newest[offset : offset + limit], "total": len(examples), "offset": offset}


def _text(body: dict, key: str) -> Any:
    """A field the command checks itself (a class name): passed as given, so the loop says what is wrong."""
    return body.get(key, "")


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(data), status=status, content_type="application/json")
