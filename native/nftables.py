"""libnftables, nftables' own library, bound in cffi ABI mode: rulesets in and out as JSON.

    with Nftables() as nft:
        nft.run([{"add": {"table": {"family": "inet", "name": "thaw-thaw0"}}}])
        tables = nft.run([{"list": {"tables": {}}}])["nftables"]

Why this and not another way in:
- `nft` subprocesses parse text and fork a process per change; the library takes the same JSON
  schema (libnftables-json(5)) and applies a whole batch in one netlink transaction: all or nothing.
- Debian's python3-nftables wraps the same few calls with ctypes, but it lives in the system's
  dist-packages, which thaw's venv does not see (letting it see them would let Debian's packages
  shadow the pinned ones), and only native/ binds C. So the shared library alone (Debian's
  `libnftables1`, in scripts/setup) is loaded here, like QPL, with `ffi.dlopen` at run time.
- pyroute2's nftables module speaks raw netlink expressions; NAT, ct state and reject would be
  built by hand there, and it calls itself experimental.

The declarations are libnftables(3)'s. A context is not thread-safe: calls are serialized here.
With output set to JSON the library also reads its input as JSON.
"""

from __future__ import annotations

import json
import threading
from types import TracebackType
from typing import Any

from cffi import FFI

LIBRARY = "libnftables.so.1"
NFT_CTX_DEFAULT = 0
NFT_CTX_OUTPUT_JSON = 1 << 4  # enum nft_output_flags in nftables/libnftables.h

_CDEF = """
struct nft_ctx;
struct nft_ctx *nft_ctx_new(uint32_t flags);
void nft_ctx_free(struct nft_ctx *ctx);
unsigned int nft_ctx_output_get_flags(struct nft_ctx *ctx);
void nft_ctx_output_set_flags(struct nft_ctx *ctx, unsigned int flags);
int nft_ctx_buffer_output(struct nft_ctx *ctx);
int nft_ctx_buffer_error(struct nft_ctx *ctx);
const char *nft_ctx_get_output_buffer(struct nft_ctx *ctx);
const char *nft_ctx_get_error_buffer(struct nft_ctx *ctx);
int nft_run_cmd_from_buffer(struct nft_ctx *nft, const char *buf);
"""

_ffi = FFI()
_ffi.cdef(_CDEF)
_lib: Any = None
_load_lock = threading.Lock()


class NftablesError(Exception):
    """libnftables is missing, or refused a batch (the message is the library's own)."""


def _library() -> Any:
    global _lib
    with _load_lock:
        if _lib is None:
            try:
                _lib = _ffi.dlopen(LIBRARY)
            except OSError as e:
                raise NftablesError(f"{LIBRARY} cannot be loaded (Debian: apt-get install libnftables1): {e}") from e
        return _lib


class Nftables:
    """One libnftables context with JSON input and output, buffered (nothing goes to stdout)."""

    def __init__(self) -> None:
        self.lib = _library()
        ctx = self.lib.nft_ctx_new(NFT_CTX_DEFAULT)
        if ctx == _ffi.NULL:
            raise NftablesError("nft_ctx_new failed")
        self.ctx: Any = ctx
        self.lock = threading.Lock()
        flags = self.lib.nft_ctx_output_get_flags(ctx)
        self.lib.nft_ctx_output_set_flags(ctx, flags | NFT_CTX_OUTPUT_JSON)
        if self.lib.nft_ctx_buffer_output(ctx) or self.lib.nft_ctx_buffer_error(ctx):
            self.close()
            raise NftablesError("libnftables cannot buffer its output")

    def run(self, commands: list[dict[str, Any]]) -> dict[str, Any]:
        """Apply `commands` (libnftables-json(5) objects) as one transaction; the parsed reply,
        {} when there is none. NftablesError with the library's message if it refused."""
        if self.ctx is None:
            raise NftablesError("this nftables context is closed")
        batch = json.dumps({"nftables": [{"metainfo": {"json_schema_version": 1}}, *commands]}).encode()
        with self.lock:
            rc = self.lib.nft_run_cmd_from_buffer(self.ctx, batch)
            out = _ffi.string(self.lib.nft_ctx_get_output_buffer(self.ctx)).decode()
            err = _ffi.string(self.lib.nft_ctx_get_error_buffer(self.ctx)).decode()
        if rc != 0:
            raise NftablesError(err.strip() or f"libnftables refused the batch (rc {rc})")
        return json.loads(out) if out.strip() else {}

    def close(self) -> None:
        if self.ctx is not None:
            self.lib.nft_ctx_free(self.ctx)
            self.ctx = None

    def __enter__(self) -> Nftables:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
