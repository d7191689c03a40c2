"""``--lora-modules``: adapters stored at start-up, through the same path as an upload.

Each is validated against the base model and stored under its name (a new
version if the name held other files, nothing written if it held these). The
server reports ready only after all of them are stored; one that cannot be
stored stops the start-up with a message naming it, as vLLM does, so a
deployment never runs without an adapter it was told to serve.
"""

from __future__ import annotations

from contextlib import ExitStack

from adapters_store.errors import AdapterError
from adapters_store.upload import ARCHIVE_SUFFIXES, folder_files
from server.adapters.registry import AdapterRegistry
from server.api.errors import ApiError
from server.config import LoraModule


class LoraModuleError(Exception):
    """A ``--lora-modules`` entry that cannot be served; the message names it and why."""


async def register_lora_modules(registry: AdapterRegistry, modules: tuple[LoraModule, ...]) -> None:
    for module in modules:
        where = f"--lora-modules {module.name}={module.path}"
        if module.base_model_name is not None and module.base_model_name != registry.base_name:
            raise LoraModuleError(
                f"{where}: base_model_name {module.base_model_name!r} is not the served base model "
                f"{registry.base_name!r}"
            )
        if not module.path.is_dir() and not module.path.name.lower().endswith(ARCHIVE_SUFFIXES):
            raise LoraModuleError(f"{where}: give a PEFT folder, or a {', '.join(ARCHIVE_SUFFIXES)} archive of one")
        try:
            with ExitStack() as stack:
                if module.path.is_dir():
                    files = folder_files(module.path, stack)
                else:  # the archive itself
                    files = [(module.path.name, stack.enter_context(module.path.open("rb")))]
                await registry.upload(module.name, files, dry_run=False)  # logs it
        except (AdapterError, ApiError, OSError) as exc:
            raise LoraModuleError(f"{where}: {exc}") from exc
