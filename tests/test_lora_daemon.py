"""LoRA serving through thawd: import, a sandboxed worker, OpenAI completions, crashes and bad input."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
from peft import PeftModel
from transformers import LlamaForCausalLM

from sandbox.cgroups import CgroupTree
from tests.lora_models import ALL_PROJECTIONS, make_adapter, make_base
from tests.thawd import Thawd

pytestmark = [pytest.mark.privileged, pytest.mark.slow]
NAME = "thawl0"
SANDBOX_UID = 65534


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("lora-made")
    base = make_base(d / "base")
    other = make_base(d / "other", hidden_size=32, intermediate_size=64)
    return {
        "base": base,
        "a1": make_adapter(base, d / "a1", seed=1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        "a2": make_adapter(base, d / "a2", seed=2, r=8, lora_alpha=16, target_modules=ALL_PROJECTIONS),
        "big": make_adapter(base, d / "big", seed=3, r=32, lora_alpha=8, target_modules=["q_proj"]),
        "wrong": make_adapter(other, d / "wrong", seed=4, r=4, lora_alpha=8, target_modules=["q_proj"]),
    }


@pytest.fixture(scope="module")
def thawd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Thawd]:
    daemon = Thawd(
        tmp_path_factory.mktemp("thawd-lora"),
        NAME,
        "10.237.0.0/24",
        sandboxes_prewarm=0,
        lora_max_rank=16,
        lora_request_timeout=3,
    )
    with daemon.serving():
        yield daemon
    tree = CgroupTree(NAME)
    assert tree.children() == []
    tree.remove()


@pytest.fixture(scope="module")
def served(thawd: Thawd, made: dict[str, Path]) -> Thawd:
    status, reply = thawd.api("POST", "/lora/models", {"name": "tiny", "source": str(made["base"])})
    assert status == 201, reply
    status, reply = thawd.api("POST", "/lora/workers", {"model": "tiny", "max_batch": 8, "slots": 4})
    assert status == 201 and reply["state"] == "ready", reply
    for name in ("a1", "a2"):
        status, reply = thawd.api("POST", "/lora/adapters", {"name": name, "model": "tiny", "source": str(made[name])})
        assert status == 201, reply
    return thawd


def greedy(made: dict[str, Path], prompt: list[int], adapter: str | None, n: int) -> list[int]:
    base = LlamaForCausalLM.from_pretrained(made["base"])
    model = PeftModel.from_pretrained(base, made[adapter]) if adapter else base
    with torch.no_grad():
        out = model.eval().generate(input_ids=torch.tensor([prompt]), max_new_tokens=n, do_sample=False)
    return list(out[0, len(prompt) :].tolist())


def complete(thawd: Thawd, model: str, prompt: Any, **params: Any) -> tuple[int, Any]:
    return thawd.api("POST", "/v1/completions", {"model": model, "prompt": prompt, "temperature": 0, **params})


def test_completions_from_adapters_and_the_base_match_peft(served: Thawd, made: dict[str, Path]) -> None:
    prompts = {"a1": [5, 6, 7, 8], "a2": [9, 10, 11], "tiny": [3, 1, 4, 1, 5]}
    with ThreadPoolExecutor(6) as pool:  # concurrent requests batch together in the worker
        replies = dict(
            zip(
                list(prompts) * 2,
                pool.map(lambda m: complete(served, m, prompts[m], max_tokens=8), list(prompts) * 2),
                strict=True,
            )
        )
    for model, (status, reply) in replies.items():
        assert status == 200, reply
        assert reply["object"] == "text_completion" and reply["model"] == model
        choice = reply["choices"][0]
        expected = greedy(made, prompts[model], None if model == "tiny" else model, 8)
        assert choice["token_ids"] == expected
        assert choice["finish_reason"] == "length"
        assert reply["usage"] == {
            "prompt_tokens": len(prompts[model]),
            "completion_tokens": 8,
            "total_tokens": len(prompts[model]) + 8,
        }

    status, models = served.api("GET", "/v1/models")
    assert status == 200
    assert {(m["id"], m["parent"]) for m in models["data"]} == {("tiny", None), ("a1", "tiny"), ("a2", "tiny")}


def test_the_worker_runs_sandboxed_and_torch_stays_out_of_thawd(served: Thawd) -> None:
    status, workers = served.api("GET", "/lora/workers")
    assert status == 200
    (worker,) = workers["workers"]
    process = psutil.Process(worker["pid"])
    assert process.uids().real == SANDBOX_UID
    assert os.readlink(f"/proc/{worker['pid']}/ns/pid") != os.readlink("/proc/self/ns/pid")
    assert os.readlink(f"/proc/{worker['pid']}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
    assert any("libtorch" in m.path for m in process.memory_maps())
    assert served.process is not None
    assert not any("libtorch" in m.path for m in psutil.Process(served.process.pid).memory_maps())
    status, detail = served.api("GET", "/lora/workers/tiny")
    assert status == 200 and detail["stats"]["adapters"] == 2 and detail["stats"]["device"] == "cpu"


def test_bad_requests_and_adapters_are_refused_clearly(served: Thawd, made: dict[str, Path]) -> None:
    status, reply = complete(served, "nope", [1, 2])
    assert status == 404 and "no model or adapter named 'nope'" in reply["error"]["message"]
    status, reply = complete(served, "a1", [1, 2], stream=True)
    assert status == 400 and "'stream' is not supported" in reply["error"]["message"]
    status, reply = complete(served, "a1", [1, 2], top_p=0.5)
    assert status == 400 and "'top_p' is not supported" in reply["error"]["message"]
    status, reply = complete(served, "a1", [1, 2], max_tokens=2, top_p=1, stop=None, user="u1")  # the defaults
    assert status == 200, reply
    status, reply = complete(served, "a1", "words")
    assert status == 400 and "without a tokenizer" in reply["error"]["message"]
    status, reply = complete(served, "a1", [1, 2], max_tokens=0)
    assert status == 400 and "max_tokens" in reply["error"]["message"]
    status, reply = served.api("POST", "/lora/workers", {"model": "tiny", "merge_after": 0})
    assert status == 400 and "merge_after must be a positive integer" in reply["error"]["message"]
    status, reply = served.api("POST", "/lora/workers", {"model": "tiny", "slot": 3})
    assert status == 400 and "unknown worker settings: slot" in reply["error"]["message"]

    status, reply = served.api(
        "POST", "/lora/adapters", {"name": "wrong", "model": "tiny", "source": str(made["wrong"])}
    )
    assert status == 400 and "does not fit" in reply["error"]["message"], reply
    status, reply = served.api("POST", "/lora/adapters", {"name": "big", "model": "tiny", "source": str(made["big"])})
    assert status == 400 and "rank 32 is above the worker's maximum rank 16" in reply["error"]["message"], reply
    status, reply = served.api("POST", "/lora/adapters", {"name": "a1", "model": "tiny", "source": str(made["a1"])})
    assert status == 409
    status, listed = served.api("GET", "/lora/adapters")
    assert sorted(a["name"] for a in listed["adapters"]) == ["a1", "a2"]  # nothing half-registered


def test_a_worker_that_does_not_answer_times_out_with_504(served: Thawd, made: dict[str, Path]) -> None:
    pid = served.api("GET", "/lora/workers/tiny")[1]["pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        status, reply = complete(served, "a2", [1, 2, 3], max_tokens=2)
    finally:
        os.kill(pid, signal.SIGCONT)
    assert status == 504 and reply["error"]["code"] == "timeout"
    assert "did not answer within 3 s" in reply["error"]["message"]
    status, reply = complete(served, "a2", [9, 10, 11], max_tokens=4)  # the worker goes on
    assert status == 200 and reply["choices"][0]["token_ids"] == greedy(made, [9, 10, 11], "a2", 4)


def test_a_crashed_worker_fails_requests_clearly_and_restarts(served: Thawd, made: dict[str, Path]) -> None:
    status, workers = served.api("GET", "/lora/workers")
    pid = workers["workers"][0]["pid"]
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while served.api("GET", "/lora/workers/tiny")[1]["state"] != "crashed":
        assert time.monotonic() < deadline, "thawd did not notice the worker died"
        time.sleep(0.05)
    status, reply = complete(served, "a1", [1, 2])
    assert status == 503 and reply["error"]["code"] == "worker_crashed"
    assert "restart" in reply["error"]["message"] and "killed by SIGKILL" in reply["error"]["message"]
    assert served.api("GET", "/health")[0] == 200

    result = served.cli("lora", "restart", "tiny", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["adapters"] == ["a1", "a2"]  # re-registered from the pool
    status, reply = complete(served, "a1", [5, 6, 7, 8], max_tokens=4)
    assert status == 200 and reply["choices"][0]["token_ids"] == greedy(made, [5, 6, 7, 8], "a1", 4)


def test_cli_lists_and_completes_and_stopping_a_worker_ends_its_sandbox(served: Thawd) -> None:
    listed = served.cli("lora", "adapters")
    assert listed.returncode == 0 and "a1" in listed.stdout and "a2" in listed.stdout
    done = served.cli("lora", "complete", "a2", "--json", "-", "--max-tokens", "3", stdin=b"")
    assert done.returncode == 1 and "'prompt' is empty" in done.stderr
    pid = served.api("GET", "/lora/workers/tiny")[1]["pid"]
    stopped = served.cli("lora", "stop", "tiny")
    assert stopped.returncode == 0, stopped.stderr
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    status, reply = complete(served, "a1", [1, 2])
    assert status == 503 and "no worker running" in reply["error"]["message"]
    removed = served.cli("lora", "rm", "--model", "tiny")
    assert removed.returncode == 0, removed.stderr
    assert served.api("GET", "/lora/models")[1]["models"] == []
    assert served.api("GET", "/lora/adapters")[1]["adapters"] == []
