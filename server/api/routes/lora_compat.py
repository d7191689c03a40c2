"""vLLM's ``POST /v1/load_lora_adapter`` and ``/v1/unload_lora_adapter``, for tools that drive vLLM this way.

Loading copies the adapter from a server-side directory into the store (fully
validated, like an upload) and onto a device slot; it only reads from the
directories the operator allowed with ``--allowed-lora-dirs``. Unloading
deletes the adapter from the store. Both need the admin token.
"""

from __future__ import annotations

import asyncio
import os
from contextlib import ExitStack
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse

from adapters_store.upload import folder_files
from server.api.admin_schemas import LoadLoraAdapterRequest, UnloadLoraAdapterRequest
from server.api.auth import Admin
from server.api.errors import ApiError
from server.api.state import State
from server.api.upload_log import UploadAttempt

router = APIRouter(tags=["admin"])


@router.post("/v1/load_lora_adapter", response_class=PlainTextResponse)
async def load_lora_adapter(body: LoadLoraAdapterRequest, _: Admin, state: State) -> PlainTextResponse:
    registry = state.registry
    with UploadAttempt("load_lora_adapter", body.lora_name), ExitStack() as stack:
        folder = _allowed_folder(body.lora_path, state.serving.config.admin.allowed_lora_dirs)
        registry.catalog.check_name_free(body.lora_name, "lora_name")
        if not body.load_inplace and body.lora_name in await asyncio.to_thread(registry.store.names):
            raise ApiError(
                400,
                f"the LoRA adapter {body.lora_name!r} has already been loaded (pass load_inplace to replace it)",
                "adapter_exists",
                "lora_name",
            )
        files = folder_files(folder, stack, lambda path: _allowed_file(folder, path.name).open("rb"))
        await registry.upload(body.lora_name, files, dry_run=False)
    await registry.load(body.lora_name, pin=False)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


@router.post("/v1/unload_lora_adapter", response_class=PlainTextResponse)
async def unload_lora_adapter(body: UnloadLoraAdapterRequest, _: Admin, state: State) -> PlainTextResponse:
    await state.registry.delete(body.lora_name)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")


def _allowed_folder(lora_path: str, allowed: tuple[Path, ...]) -> Path:
    if not allowed:
        raise ApiError(
            403,
            "loading adapters from a server path is disabled; the operator allows directories with --allowed-lora-dirs",
            "path_not_allowed",
            "lora_path",
        )
    if not lora_path or "\0" in lora_path:
        raise ApiError(400, "lora_path is empty or invalid", "invalid_request", "lora_path")
    try:
        folder = Path(lora_path).expanduser().resolve()  # symlinks followed before the check
    except (OSError, ValueError, RuntimeError):
        message = f"lora_path {lora_path[:200]!r} is not a valid path"
        raise ApiError(400, message, "invalid_request", "lora_path") from None
    if not any(folder.is_relative_to(root.resolve()) for root in allowed):
        raise ApiError(
            403, "lora_path is outside the directories the operator allowed", "path_not_allowed", "lora_path"
        )
    if not os.path.isdir(folder):  # False for any OSError (e.g. a name too long)
        raise ApiError(400, f"lora_path {lora_path[:200]!r} is not a directory", "invalid_request", "lora_path")
    return folder


def _allowed_file(folder: Path, name: str) -> Path:
    path = (folder / name).resolve()
    if path.parent != folder:
        raise ApiError(403, f"{name} in lora_path is a link leading elsewhere", "path_not_allowed", "lora_path")
    return path
