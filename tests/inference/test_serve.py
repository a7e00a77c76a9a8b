"""The OpenAI-compatible server (`scripts/serve.py`, transformers' own serving app), driven by the real `openai`
client against a saved chat folder: one server on 127.0.0.1 for all checks, stopped by PID at the end.

The folder's model answers REPLY, then `<|end|>`, then REPLY again (tests/helpers_chat.py): every endpoint must
return REPLY alone.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from helpers_chat import MESSAGES, REPLY, bigram_chat_model, chat_tokenizer, save_chat_folder
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText
from transformers.cli.serving.utils import Modality

from sonett import SonettForConditionalGeneration, SonettImageProcessor, SonettProcessor
from sonett.inference.serving import DEFAULT_HOST, SonettModelManager, add_missing_stop_tokens, auto_class_for

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 120  # the server imports torch and transformers and loads the model before it answers
LIFETIME_S = 300  # `timeout` ends the server even if this process dies without cleaning up


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((DEFAULT_HOST, 0))
        return sock.getsockname()[1]


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("served")
    save_chat_folder(folder)
    port = free_port()
    log_path = folder.parent / "server.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "modeling"), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = ["timeout", str(LIFETIME_S), sys.executable, str(ROOT / "scripts" / "serve.py"), str(folder)]
    command += ["--port", str(port), "--device", "cpu"]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://{DEFAULT_HOST}:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"the server exited with {process.returncode}:\n{log_path.read_text()[-5000:]}")
            try:
                if get_json(f"{base}/health") == {"status": "ok"}:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the server did not answer within {START_TIMEOUT_S} s:\n{log_path.read_text()[-5000:]}")
            time.sleep(0.5)
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", timeout=60, max_retries=0)
        yield {"client": client, "model": str(folder), "base": base, "log": log_path}
    finally:
        os.killpg(process.pid, signal.SIGTERM)  # the group: `timeout` and the server it started
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=15)


def test_health_and_model_list(server):
    assert get_json(f"{server['base']}/health") == {"status": "ok"}
    assert [model.id for model in server["client"].models.list().data] == [server["model"]]


def test_chat_completion_stops_at_the_end_of_the_turn(server):
    response = server["client"].chat.completions.create(model=server["model"], messages=MESSAGES, temperature=0)
    choice = response.choices[0]
    assert choice.message.content == REPLY
    assert choice.message.role == "assistant"
    assert choice.finish_reason == "stop"
    assert response.usage.completion_tokens == 4  # the reply's 3 tokens and <|end|>


def test_streamed_chunks_concatenate_to_the_same_reply(server):
    stream = server["client"].chat.completions.create(model=server["model"], messages=MESSAGES, stream=True)
    chunks = list(stream)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == REPLY
    assert len([chunk for chunk in chunks if chunk.choices and chunk.choices[0].delta.content]) > 1
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_text_completion(server):
    response = server["client"].completions.create(model=server["model"], prompt="<|start|>assistant\n", max_tokens=20)
    assert response.choices[0].text == REPLY
    assert response.choices[0].finish_reason == "stop"


def test_server_logs_which_loading_path_it_took(server):
    log = server["log"].read_text()
    own = "with transformers 5" in log and "own loading path" in log
    workaround = "cannot load remote-code models itself" in log and "through AutoModelForCausalLM" in log
    assert own != workaround, log[-3000:]


def test_auto_class_comes_from_the_auto_map(server, tmp_path):
    config = AutoConfig.from_pretrained(server["model"])
    assert auto_class_for(config) is AutoModelForCausalLM
    config.architectures = ["SonettForConditionalGeneration"]
    vlm_class = "modeling_sonett.SonettForConditionalGeneration"
    config.auto_map = {**config.auto_map, "AutoModelForImageTextToText": vlm_class}
    assert auto_class_for(config) is AutoModelForImageTextToText
    config.auto_map = {"AutoConfig": "configuration_sonett.SonettConfig"}
    with pytest.raises(ValueError, match="names no AutoModelForImageTextToText or AutoModelForCausalLM"):
        auto_class_for(config)


def test_folders_without_the_turn_end_in_their_generation_config_get_it():
    tokenizer = chat_tokenizer()
    model = bigram_chat_model(tokenizer)
    model.generation_config.eos_token_id = tokenizer.eos_token_id  # as folders saved before issue 14 have it
    add_missing_stop_tokens(model, tokenizer)
    assert model.generation_config.eos_token_id == [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|end|>")]


def test_modality_of_remote_code_classes():
    tokenizer = chat_tokenizer()
    text = bigram_chat_model(tokenizer)
    vision = {"hidden_size": 32, "intermediate_size": 64, "image_size": 16, "patch_size": 4}
    multimodal = SonettForConditionalGeneration.from_text_model(
        text, cross_attention_layers=[1], vision_config=vision, image_token_id=tokenizer.image_token_id
    )
    processor = SonettProcessor(SonettImageProcessor(), tokenizer)
    assert SonettModelManager.get_model_modality(text, processor=tokenizer) == Modality.LLM
    assert SonettModelManager.get_model_modality(multimodal, processor=processor) == Modality.VLM
    assert SonettModelManager.get_model_modality(text, processor=None) == Modality.LLM


def crafted_folder(folder, marker):
    """A folder whose config's remote code writes `marker` when anything imports it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(
        json.dumps({"model_type": "crafted", "architectures": ["X"], "auto_map": {"AutoConfig": "evil.Config"}})
    )
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    return folder


def post(url: str, body: dict) -> tuple[int, str]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_the_server_loads_no_other_model_and_runs_no_other_code(server, tmp_path):
    """The server trusts remote code for the folder it was started with only: transformers' `/load_model` and
    `/reset` routes are gone, so a request cannot make it import another folder's code."""
    marker = tmp_path / "ran"
    evil = crafted_folder(tmp_path / "evil", marker)
    for route in ("/load_model", "/reset"):
        status, _ = post(f"{server['base']}{route}", {"model": str(evil)})
        assert status in (404, 405), route
    with pytest.raises(openai.BadRequestError):
        server["client"].chat.completions.create(model=str(evil), messages=MESSAGES, max_tokens=4)
    assert not marker.exists()
    assert get_json(f"{server['base']}/health") == {"status": "ok"}  # still serving its own folder


def test_the_manager_refuses_any_model_but_its_own(tmp_path):
    marker = tmp_path / "ran"
    evil = crafted_folder(tmp_path / "evil", marker)
    manager = SonettModelManager.__new__(SonettModelManager)  # no preload: only the refusal is under test
    manager.force_model = str(tmp_path / "served")
    with pytest.raises(ValueError, match="serves only"):
        manager.load_model_and_processor(str(evil))
    assert not marker.exists()
