"""
Tests for data/download.py and the poems/download.py command, against a local HTTP server (never the internet).

The server serves the real corpus from ../shared/corpus/quan-tang-shi under the same
percent-encoded 全唐诗/ folder as upstream, supports `Range: bytes=N-`, and records
every request, so the tests can check what the downloader actually asked for.
"""

import hashlib
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote, unquote

import pytest

from data.corpus import local_corpus_dir
from data.download import (
    FILE_NAMES,
    SHA256,
    DownloadError,
    download_corpus,
    verify_corpus,
)

REPO = Path(__file__).resolve().parents[1]
CORPUS = local_corpus_dir()
FOLDER = "/" + quote("全唐诗") + "/"  # /%E5%85%A8%E5%94%90%E8%AF%97/
NAMES = ["poet.tang.0.json", "poet.tang.57000.json"]  # a couple of files keeps tests fast


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class FakeUpstream:
    """State shared between a test and the server's handler threads."""

    def __init__(self, url: str):
        self.url = url                 # base URL to pass to download_corpus
        self.requests = []             # (raw request path, Range header or None)
        self.corrupt: set[str] = set() # file names to serve with one byte flipped
        self.ignore_range = False      # answer 200 with the whole file even if asked for a Range

    def paths(self) -> list[str]:
        return [path for path, _ in self.requests]


def make_handler(state: FakeUpstream):
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            state.requests.append((self.path, self.headers.get("Range")))
            path = unquote(self.path)
            prefix = unquote(FOLDER)
            name = path[len(prefix):]
            if not path.startswith(prefix) or name not in FILE_NAMES:
                self.send_error(404)
                return
            body = (CORPUS / name).read_bytes()
            if name in state.corrupt:
                body = body[:100] + bytes([body[100] ^ 1]) + body[101:]
            status, start = 200, 0
            rng = self.headers.get("Range")
            if rng and not state.ignore_range:
                assert rng.startswith("bytes=") and rng.endswith("-"), rng
                start = int(rng[len("bytes="):-1])
                if start >= len(body):
                    self.send_error(416)
                    return
                status = 206
            self.send_response(status)
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            self.send_header("Content-Length", str(len(body) - start))
            self.end_headers()
            self.wfile.write(body[start:])

        def log_message(self, *args):  # keep pytest output quiet
            pass

    return Handler


@pytest.fixture
def upstream():
    assert CORPUS.is_dir(), f"tests need the shared corpus at {CORPUS}"
    state = FakeUpstream(url="")
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(state))
    state.url = f"http://127.0.0.1:{server.server_address[1]}{FOLDER}"
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture
def dead_url():
    # bind to get a free port, then close it: nothing listens there any more
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}{FOLDER}"


def test_download_into_empty_dir(upstream, tmp_path):
    dest = tmp_path / "new" / "poems"  # download_corpus creates it
    paths = download_corpus(dest, base_url=upstream.url, names=NAMES)
    assert paths == [dest / name for name in NAMES]
    for name in NAMES:
        assert sha256(dest / name) == SHA256[name] == sha256(CORPUS / name)
    assert not list(dest.glob("*.part"))
    assert upstream.paths() == [FOLDER + name for name in NAMES]
    assert FOLDER == "/%E5%85%A8%E5%94%90%E8%AF%97/"
    assert all(rng is None for _, rng in upstream.requests)


def test_resume_from_part(upstream, tmp_path):
    name, k = NAMES[0], 12345
    (tmp_path / (name + ".part")).write_bytes((CORPUS / name).read_bytes()[:k])
    download_corpus(tmp_path, base_url=upstream.url, names=[name])
    assert upstream.requests == [(FOLDER + name, f"bytes={k}-")]
    assert sha256(tmp_path / name) == SHA256[name]
    assert not (tmp_path / (name + ".part")).exists()


def test_server_ignoring_range_restarts_from_zero(upstream, tmp_path):
    upstream.ignore_range = True
    name, k = NAMES[0], 12345
    (tmp_path / (name + ".part")).write_bytes((CORPUS / name).read_bytes()[:k])
    download_corpus(tmp_path, base_url=upstream.url, names=[name])
    assert upstream.requests == [(FOLDER + name, f"bytes={k}-")]  # asked, but got 200
    assert sha256(tmp_path / name) == SHA256[name]
    assert not (tmp_path / (name + ".part")).exists()


def test_part_too_long_is_restarted(upstream, tmp_path):
    # a .part longer than the file gets 416 Range Not Satisfiable; start over
    name = NAMES[0]
    (tmp_path / (name + ".part")).write_bytes((CORPUS / name).read_bytes() + b"junk")
    download_corpus(tmp_path, base_url=upstream.url, names=[name])
    assert [rng for _, rng in upstream.requests][-1] is None
    assert sha256(tmp_path / name) == SHA256[name]


def test_complete_part_is_renamed_without_request(upstream, tmp_path):
    # a run that died between the download and the rename leaves a finished .part
    name = NAMES[0]
    (tmp_path / (name + ".part")).write_bytes((CORPUS / name).read_bytes())
    download_corpus(tmp_path, base_url=upstream.url, names=[name])
    assert upstream.requests == []
    assert sha256(tmp_path / name) == SHA256[name]


def test_corrupted_download_is_rejected(upstream, tmp_path):
    bad = NAMES[1]
    upstream.corrupt.add(bad)
    with pytest.raises(DownloadError, match=bad.replace(".", r"\.")) as exc:
        download_corpus(tmp_path, base_url=upstream.url, names=NAMES)
    msg = str(exc.value)
    assert "\n" not in msg and SHA256[bad][:12] in msg
    assert sha256(tmp_path / NAMES[0]) == SHA256[NAMES[0]]  # the good one was kept
    assert not (tmp_path / bad).exists()
    assert not (tmp_path / (bad + ".part")).exists()


def test_present_correct_file_is_not_requested(upstream, tmp_path):
    have, want = NAMES
    (tmp_path / have).write_bytes((CORPUS / have).read_bytes())
    download_corpus(tmp_path, base_url=upstream.url, names=NAMES)
    assert upstream.paths() == [FOLDER + want]
    assert verify_corpus(tmp_path) == [n for n in FILE_NAMES if n not in NAMES]


def test_present_wrong_file_is_left_alone(upstream, tmp_path):
    name = NAMES[0]
    (tmp_path / name).write_bytes(b"my own edits")
    with pytest.raises(DownloadError, match="delete it") as exc:
        download_corpus(tmp_path, base_url=upstream.url, names=NAMES)
    assert name in str(exc.value) and "\n" not in str(exc.value)
    assert (tmp_path / name).read_bytes() == b"my own edits"
    assert upstream.requests == []  # checked before any download


def test_unreachable_server(dead_url, tmp_path):
    with pytest.raises(DownloadError) as exc:
        download_corpus(tmp_path, base_url=dead_url, names=NAMES, timeout=5)
    msg = str(exc.value)
    assert "\n" not in msg
    assert "--poems" in msg and NAMES[0] in msg and dead_url in msg
    assert not (tmp_path / NAMES[0]).exists()


def test_http_error(upstream, tmp_path):
    with pytest.raises(DownloadError, match="HTTP 404") as exc:
        download_corpus(tmp_path, base_url=upstream.url + "missing/", names=NAMES[:1])
    assert "--poems" in str(exc.value) and "\n" not in str(exc.value)


def test_base_url_from_env(upstream, tmp_path, monkeypatch):
    monkeypatch.setenv("POEMS_BASE_URL", upstream.url)
    download_corpus(tmp_path, names=NAMES[:1])
    assert upstream.paths() == [FOLDER + NAMES[0]]


def test_unknown_name(tmp_path):
    with pytest.raises(DownloadError, match="unknown"):
        download_corpus(tmp_path, base_url="http://127.0.0.1:9/", names=["poet.song.0.json"])


def test_pinned_hashes_match_shared_corpus():
    assert FILE_NAMES == [f"poet.tang.{n}.json" for n in range(0, 58000, 1000)]
    assert set(SHA256) == set(FILE_NAMES)
    assert verify_corpus(CORPUS) == []


@pytest.mark.slow
def test_main_exits_2_when_offline(dead_url, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "poems.download", "--dest", str(tmp_path / "p"), "--base-url", dead_url],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: could not download"), proc.stderr
    assert "--poems" in lines[0] and "Traceback" not in proc.stderr
    assert proc.stdout == ""
