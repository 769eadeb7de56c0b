"""The QPL stand-in: tests/qpl_standin.c, QPL's entry points over zlib, built with the `qpl_job`
offsets written here from QPL's header (never taken from the binding), so a wrong offset in the
binding breaks the round trips through it. The `standin` fixture (conftest.py) builds it once."""

from __future__ import annotations

import subprocess
from pathlib import Path

STANDIN_SOURCE = Path(__file__).with_name("qpl_standin.c")

# Byte offsets of the `qpl_job` fields the binding uses, read from include/qpl/c_api/job.h of
# intel/qpl, QPL 1.6 (x86-64 SysV ABI: pointers 8 bytes, enums and uint32_t 4): next_in_ptr,
# available_in, total_in, next_out_ptr, available_out, total_out, op, flags, crc, xor_checksum,
# last_bit_offset, level, ... in that order, so level follows three uint32_t after flags.
HEADER_OFFSETS = {
    "next_in_ptr": 0,
    "available_in": 8,
    "total_in": 12,
    "next_out_ptr": 16,
    "available_out": 24,
    "total_out": 28,
    "op": 32,
    "flags": 36,
    "level": 52,
}
HEADER_JOB_SIZE = 240  # sizeof(qpl_job): ... int32_t numa_id at 188, then qpl_data (5 pointers + enum) at 192


def build_standin(out: Path, offsets: dict[str, int], job_size: int) -> Path:
    defines = [f"-DQPL_OFF_{name.upper()}={offset}" for name, offset in offsets.items()]
    command = ["gcc", "-shared", "-fPIC", "-O2", "-Wall", "-Wextra", str(STANDIN_SOURCE), "-o", str(out), "-lz"]
    subprocess.run([*command, *defines, f"-DQPL_JOB_SIZE={job_size}"], check=True, capture_output=True, text=True)
    return out
