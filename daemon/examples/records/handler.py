"""A Python-heavy function: its init imports a good part of the standard library and builds an
object graph of records (strings, ints, floats, lists, dicts; $RECORDS of them, 150,000 by
default), the kind of state whose pages compress well. `/work` reads 20,000 records; any other
path answers at once. The codec and compressed-restore benchmarks use it."""

import asyncio  # noqa: F401  (imported for the pages they bring, as a real function's would)
import collections  # noqa: F401
import csv  # noqa: F401
import dataclasses  # noqa: F401
import decimal  # noqa: F401
import email.parser  # noqa: F401
import fractions  # noqa: F401
import http.client  # noqa: F401
import json  # noqa: F401
import logging  # noqa: F401
import os
import random
import sqlite3  # noqa: F401
import statistics  # noqa: F401
import string
import urllib.parse  # noqa: F401
import uuid  # noqa: F401
import xml.etree.ElementTree  # noqa: F401
from typing import Any

RNG = random.Random(1)
WORDS = ["".join(RNG.choices(string.ascii_lowercase, k=RNG.randint(3, 10))) for _ in range(5000)]
RECORDS = [
    {
        "id": i,
        "name": f"user-{i}",
        "email": f"user{i}@example.com",
        "score": RNG.random(),
        "tags": [RNG.choice(WORDS) for _ in range(5)],
        "visits": list(range(i % 17)),
        "address": {"city": RNG.choice(WORDS).title(), "zip": f"{RNG.randint(0, 99999):05d}"},
    }
    for i in range(int(os.environ.get("RECORDS", "150000")))
]
INDEX = {r["name"]: r for r in RECORDS}


def handle(event: Any, context: Any) -> dict[str, Any]:
    if event.path == "/work":
        return {"score": sum(r["score"] for r in RECORDS[:20000]), "user": INDEX["user-7"]["email"]}
    return {"ok": True}
