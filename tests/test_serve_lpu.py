"""The server on a compiled Program: each response carries the Program's simulated LPU figures in
its own "x_openlpu" field, read off the schedule by the timing model, and `usage` stays host time."""

import json

import httpx
import pytest

from openlpu.compiler import verify
from openlpu.serve.app import ServeSettings, create_app, running_server
from openlpu.serve.lpu import program_hook
from openlpu.sim.timing import timing


@pytest.fixture(scope="module")
def served():
    from openlpu.runtime.engine import Engine

    engine = Engine.load(max_batch=2)
    program = engine.program  # the Program the engine executes
    assert verify(program) == [] and program.system.name == "lpu-v1"
    app = create_app(engine, ServeSettings(simulated_lpu=program_hook(program)))
    with running_server(app) as url:
        yield url, engine.model_name, timing(program)


def body(model, stream=False):
    return {"model": model, "messages": [{"role": "user", "content": "Say hi"}], "temperature": 0,
            "max_completion_tokens": 6, "stream": stream}


def test_response_carries_the_programs_figures_apart_from_usage(served):
    url, model, t = served
    reply = httpx.post(url + "/openai/v1/chat/completions", json=body(model), timeout=120).json()
    lpu = reply["x_openlpu"]
    assert lpu["label"] == "simulated" and lpu["chips"] == t.chips
    assert lpu["output_tokens_per_s"] == pytest.approx(t.tokens_per_s_per_user)
    n = reply["usage"]["completion_tokens"]
    assert lpu["completion_time_s"] == pytest.approx(n / t.tokens_per_s_per_user)
    # usage is what the host took: a CPU run of a 270M model is far slower than the simulated LPU
    assert reply["usage"]["completion_time"] > lpu["completion_time_s"]
    assert not set(reply["usage"]) & set(lpu)


def test_stream_ends_with_the_figures(served):
    url, model, t = served
    chunks = []
    with httpx.stream("POST", url + "/openai/v1/chat/completions", json=body(model, True), timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
    with_figures = [c for c in chunks if "x_openlpu" in c]
    assert with_figures and with_figures[-1]["choices"][0]["finish_reason"] is not None
    assert with_figures[-1]["x_openlpu"]["output_tokens_per_s"] == pytest.approx(t.tokens_per_s_per_user)
