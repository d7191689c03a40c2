"""Bodies of the admin routes and the vLLM-compatible adapter routes."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from server.api.schemas import Text


class AdapterInfo(BaseModel):
    """One stored adapter: what it is, where it lives now, and how it has been used."""

    name: str
    version: str | None = Field(description="sha256 of the adapter's files (null: not readable under this name)")
    state: str = Field(description="stored | loading | host | device | failed | retiring | invalid")
    tier: str = Field(description="the fastest tier holding it: device | host | disk")
    pinned: bool = False
    in_flight: int = Field(0, description="requests using it now (waiting or running)")
    rank: int | None = None
    alpha: float | None = None
    use_rslora: bool | None = None
    target_modules: list[str] | None = None
    modules: int | None = None
    dtypes: list[str] | None = None
    bytes: int | None = None
    base_model_name_or_path: str | None = None
    last_used: float | None = Field(None, description="unix time of the last request naming it")
    load_count: int = Field(0, description="loads from disk into host memory")
    activations: int = Field(0, description="copies from host memory into a device slot")
    last_load_ms: float | None = None
    last_activation_ms: float | None = None
    error: str | None = None


class StoreCheckInfo(BaseModel):
    """The start-up check of the store's adapters, which runs in the background."""

    state: str = Field(description="running | done | stopped | failed")
    found: int = Field(description="adapters in the store at start-up")
    checked: int = Field(description="checked so far, valid or not")
    invalid: int = Field(description="checked and found invalid (listed with state 'invalid' and the error)")
    not_checked: int = Field(description="with no copy on this replica (a shared store): checked on first use")
    ignored: int = Field(description="entries of the store that are not adapters (named in the log)")


class AdapterList(BaseModel):
    object: str = "list"
    data: list[AdapterInfo]
    slots_total: int
    slots_in_use: int
    host_bytes: int
    host_bytes_limit: int
    store_check: StoreCheckInfo | None = None


class UploadResult(AdapterInfo):
    created: bool = Field(description="false when the name already had exactly this content")
    dry_run: bool = False


class LoadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    pin: bool = False


class LoadLoraAdapterRequest(BaseModel):
    """vLLM's ``POST /v1/load_lora_adapter`` body."""

    lora_name: Text
    lora_path: Text
    load_inplace: bool = False


class UnloadLoraAdapterRequest(BaseModel):
    lora_name: Text
    lora_int_id: int | None = None
