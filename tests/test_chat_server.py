"""The chat page's server over real HTTP: the page, a streamed answer, two clients at once, a
client that leaves mid-answer, and every bad request a 4xx that leaves the server serving."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time

import pytest
import uvicorn

import chat
from tanggpt.chat_server import ChatService, ServerLimits, answer_marks, make_app
from tanggpt.device import setup_runtime
from tanggpt.generation import for_generation, load_for_sampling

HELLO = [{"role": "user", "content": "請用以下題目寫一首詩\n春夜"}]


class Server:
    """A uvicorn server on a free loopback port, in a thread."""

    def __init__(self, service: ChatService):
        self.service = service
        self.server = uvicorn.Server(uvicorn.Config(make_app(service), host="127.0.0.1", port=0, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]

    def connection(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def service_of(path, **limits) -> ChatService:
    runtime = setup_runtime("cpu", "float32")
    _, model, tokenizer = load_for_sampling(str(path))
    return ChatService(for_generation(model, runtime), tokenizer, runtime,
                       ServerLimits(**{"max_new_tokens": 24, **limits}), describe="tiny")


@pytest.fixture(scope="module")
def server(tiny_chat):
    running = Server(service_of(tiny_chat, max_concurrent=2))
    yield running
    running.stop()


def post(server: Server, body: object, raw: bytes | None = None, headers: dict | None = None
         ) -> http.client.HTTPResponse:
    connection = server.connection()
    data = raw if raw is not None else json.dumps(body).encode()
    connection.request("POST", "/api/chat", body=data, headers={"Content-Type": "application/json", **(headers or {})})
    return connection.getresponse()


def events(response: http.client.HTTPResponse) -> list[tuple[str, dict]]:
    """The server-sent events of a whole response, as (event, data)."""
    blocks = response.read().decode("utf-8").split("\n\n")
    parsed = []
    for block in filter(None, blocks):
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        parsed.append((fields["event"], json.loads(fields["data"])))
    return parsed


def test_the_page_is_served_whole_from_here(server):
    connection = server.connection()
    connection.request("GET", "/")
    response = connection.getresponse()
    page = response.read().decode("utf-8")
    assert response.status == 200 and response.getheader("Content-Type").startswith("text/html")
    assert "<title>唐诗 GPT" in page and "/api/chat" in page
    assert "http://" not in page and "https://" not in page and "src=" not in page  # nothing fetched from outside
    assert "innerHTML" not in page  # the model's output is shown as text
    assert "default-src 'self'" in response.getheader("Content-Security-Policy")
    connection.request("GET", "/api/info")
    info = json.loads(connection.getresponse().read())
    assert info["max_new_tokens"] == 24 and info["requests"]["poem"] == "請用以下題目寫一首詩"
    assert set(info["requests"]["form"]) == {"五言絕句", "七言絕句", "五言律詩", "七言律詩"}


def test_an_answer_streams_token_by_token_and_ends_with_its_marks(server):
    response = post(server, {"messages": HELLO, "max_new_tokens": 12})
    assert response.status == 200 and response.getheader("Content-Type").startswith("text/event-stream")
    stream = events(response)
    tokens = [data["token"] for name, data in stream if name == "message"]
    name, done = stream[-1]
    assert name == "done" and len(tokens) >= 1 and "".join(tokens) == done["text"]
    assert isinstance(done["stopped"], bool) and done["marks"] == answer_marks(done["text"])
    assert done["stopped"] or len(tokens) == 12


def test_a_poem_is_marked_and_a_title_or_form_name_is_not():
    assert answer_marks("白日依山盡，黃河入海流。\n欲窮千里目，更上一層樓。").startswith("五言絕句 · ")
    assert answer_marks("春思秋色早，空庭不夢深") == "not 絕句/律詩-shaped"  # a poem, of no regular form
    assert answer_marks("五言律詩") == answer_marks("登鸛雀樓") == ""


def test_two_clients_at_once(server):
    results = {}

    def ask(name: str) -> None:
        results[name] = events(post(server, {"messages": HELLO, "max_new_tokens": 16, "temperature": 1.0}))

    threads = [threading.Thread(target=ask, args=(name,)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert all(results[name][-1][0] == "done" for name in ("a", "b"))
    assert server.service.active == 0


def wait_for(condition, seconds: float = 20) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def slowed(service: ChatService, seconds: float) -> ChatService:
    """The service, sleeping `seconds` before each token: an answer slow enough to watch or to leave."""
    original = service.tokens

    def slowly(*args):
        for token in original(*args):
            time.sleep(seconds)
            yield token

    service.tokens = slowly
    return service


def test_a_client_that_leaves_mid_answer_frees_its_place(tiny_chat):
    slow = slowed(service_of(tiny_chat, max_concurrent=1, max_new_tokens=400), 0.05)
    server = Server(slow)
    try:
        sock = socket.create_connection(("127.0.0.1", server.port))
        body = json.dumps({"messages": HELLO, "max_new_tokens": 60, "temperature": 1.0}).encode()
        sock.sendall(b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        assert b"200 OK" in sock.recv(4096)
        assert slow.active == 1
        # While it writes, the one place is taken: another request is told to come back.
        busy = post(server, {"messages": HELLO})
        assert busy.status == 429 and "try again" in json.loads(busy.read())["error"]
        sock.close()  # leave mid-answer
        assert wait_for(lambda: slow.active == 0), "the generation was not stopped"
        assert events(post(server, {"messages": HELLO, "max_new_tokens": 4}))[-1][0] == "done"
    finally:
        server.stop()


@pytest.mark.parametrize("body, status, reason", [
    ({"messages": [{"role": "assistant", "content": "春"}]}, 400, "messages, message 1: assistant first"),
    ({"messages": [{"role": "user", "content": "春"}, {"role": "user", "content": "秋"}]}, 400,
     "messages, message 2: user after user"),
    ({"messages": [{"role": "user", "content": "春"}, {"role": "assistant", "content": "秋"}]}, 400,
     "the last message is the assistant's"),
    ({"messages": [{"role": "user", "content": "春"}], "max_new_tokens": 10_000}, 400,
     "max_new_tokens must be a whole number from 1 to 24"),
    ({"messages": [{"role": "user", "content": "春"}], "max_new_tokens": "9"}, 400, "max_new_tokens must be"),
    ({"messages": [{"role": "user", "content": "春"}], "temperature": -1}, 400, "temperature must be"),
    ({"messages": [{"role": "user", "content": "春"}], "ckpt": "other.pt"}, 400, "unknown field 'ckpt'"),
    ({"messages": "春"}, 400, "messages must be a list"),
    (["春"], 400, "the body must be a JSON object"),
    ({"messages": [{"role": "user", "content": "春" * 200}]}, 400, "leaves no room for an answer"),
])
def test_bad_requests_get_a_4xx_and_the_server_keeps_serving(server, body, status, reason):
    response = post(server, body)
    assert response.status == status and reason in json.loads(response.read())["error"]
    assert events(post(server, {"messages": HELLO, "max_new_tokens": 2}))[-1][0] == "done"


def test_malformed_and_oversize_bodies(server):
    for raw, status, reason in ((b"{not json", 400, "not JSON"), (b"\xff\xfe", 400, "not JSON"),
                                (b"{" + b" " * 20_000 + b"}", 413, "bytes")):
        response = post(server, None, raw=raw)
        assert response.status == status and reason in json.loads(response.read())["error"]
    # A chunked body carries no length to check first: it is refused as it passes the limit.
    connection = server.connection()
    connection.request("POST", "/api/chat", body=iter([b"[" + b"1," * 5000, b"1" * 10_000 + b"]"]),
                       headers={"Content-Type": "application/json"}, encode_chunked=True)
    assert connection.getresponse().status == 413
    assert events(post(server, {"messages": HELLO, "max_new_tokens": 2}))[-1][0] == "done"


def test_a_conversation_that_outgrows_the_block_is_trimmed_with_a_note(server):
    long_turns = [{"role": "user", "content": "春" * 30}, {"role": "assistant", "content": "秋" * 30}] * 2
    stream = events(post(server, {"messages": long_turns + HELLO, "max_new_tokens": 8}))
    assert stream[0] == ("note", {"note": "the conversation outgrew the model's 96 tokens: the oldest 1 exchange forgotten"})
    assert stream[-1][0] == "done"


@pytest.mark.parametrize("args, message", [
    (["--port", "70000"], "--port must be from 0 to 65535"),
    (["--max-concurrent", "0"], "--max-concurrent must be positive"),
    (["--rhyme"], "--rhyme is sample.py's"),
])
def test_bad_flags_are_one_line(capsys, tiny_chat, args, message):
    with pytest.raises(SystemExit) as exit_info:
        chat.main(["--ckpt", str(tiny_chat), *args])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and err.splitlines()[-1].startswith(f"error: {message}")


def test_only_a_chat_model_is_served(capsys, tiny_tuned):
    with pytest.raises(SystemExit) as exit_info:
        chat.main(["--ckpt", str(tiny_tuned), "--device", "cpu"])
    assert exit_info.value.code == 2 and "not tuned on conversations" in capsys.readouterr().err


def test_a_port_in_use_is_one_line(capsys, tiny_chat):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit) as exit_info:
            chat.main(["--ckpt", str(tiny_chat), "--device", "cpu", "--port", str(port)])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_info.value.code == 2 and err.startswith(f"error: --host 127.0.0.1 --port {port}: cannot listen there")


# -----------------------------------------------------------------------------
# The page in a real browser: headless Chromium from Debian's packages (.ci/run installs it)


@pytest.fixture(scope="module")
def browser():
    import os
    import shutil

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        if os.environ.get("CI"):
            pytest.fail("chromium and chromedriver are missing: .ci/run installs them from Debian's packages")
        pytest.skip("needs Chromium and its driver: apt install chromium chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=900,700"):
        options.add_argument(argument)
    session = webdriver.Chrome(service=Service(driver), options=options)  # the driver given: nothing downloaded
    yield session
    session.quit()


def test_the_page_in_a_browser_sends_a_title_and_a_poem_streams_in(browser, tiny_chat):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    server = Server(slowed(service_of(tiny_chat, max_new_tokens=40), 0.03))
    try:
        browser.get(f"http://127.0.0.1:{server.port}/")
        assert wait_for(lambda: "tiny" in browser.find_element(By.ID, "model").text)
        Select(browser.find_element(By.ID, "task")).select_by_value("poem")
        browser.find_element(By.ID, "text").send_keys("春夜")
        browser.find_element(By.ID, "send").click()
        lengths = []

        def finished() -> bool:
            answers = browser.find_elements(By.CSS_SELECTOR, ".assistant .text")
            lengths.append(len(answers[0].text) if answers else 0)
            return bool(browser.find_elements(By.CSS_SELECTOR, ".assistant .marks"))

        assert wait_for(finished, 60)
        user = browser.find_element(By.CSS_SELECTOR, ".user .text").text
        assert user == "請用以下題目寫一首詩\n春夜"  # the task switch built the request the model was tuned on
        answer = browser.find_element(By.CSS_SELECTOR, ".assistant .text").text
        assert answer and len({n for n in lengths if 0 < n < len(answer)}) >= 2  # seen growing, token by token
    finally:
        server.stop()
