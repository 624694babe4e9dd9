"""Talk to the poet in the browser: serve a chat model's page on this machine.

    python chat.py --ckpt ckpt_chat.pt                  # open http://127.0.0.1:8000
    python chat.py --ckpt ckpt_chat.pt --port 8080 --max-new-tokens 120
    python chat.py --ckpt ckpt_chat.pt --host 0.0.0.0   # reachable from other machines: only if you mean it

One page (plain HTML and JavaScript, served by this command, nothing fetched from
outside): a box for the system prompt, the conversation, a switch for the tasks (a poem on
a title, a form, an acrostic), and each answer streamed token by token and marked with its
form and rhyme as the galleries mark poems. The model is a chat model (finetune.py --format
chat); the server is tanggpt/chat_server.py, on FastAPI and uvicorn. It listens on the
loopback address only unless --host says otherwise, bounds each request's size, its
max_new_tokens and the generations running at once, and serves the --ckpt given here and
no other. Ctrl-C stops it.
"""

from __future__ import annotations

import socket
import sys
from dataclasses import dataclass

from data.errors import UserError
from tanggpt.chat_server import ChatService, ServerLimits, make_app
from tanggpt.checkpoint import KINDS, tuned_format
from tanggpt.cli import flag, require_positive, run_cli
from tanggpt.device import setup_runtime
from tanggpt.generation import SamplingConfig, for_generation, load_for_sampling


@dataclass
class ChatConfig(SamplingConfig):
    ckpt: str = flag("ckpt_chat.pt", "the chat model to serve (finetune.py --format chat)")
    base: str = flag("", "for an adapter checkpoint: its base checkpoint, when it is no longer where it was")
    host: str = flag("127.0.0.1", "the address to listen on: the loopback address (this machine only) unless you "
                                  "mean to serve others")
    port: int = flag(8000, "the port to listen on")
    max_concurrent: int = flag(2, "answers written at once; a request past them is refused (HTTP 429)")
    max_request_bytes: int = flag(16_384, "the largest request body accepted (HTTP 413 past it)")

    def validate(self) -> None:
        super().validate()
        require_positive(self, ("max_concurrent", "max_request_bytes"))
        if not 0 <= self.port <= 65535:
            raise UserError(f"--port must be from 0 to 65535, got {self.port}")
        if self.rhyme or self.compile or self.top_p < 1:
            used = "--rhyme" if self.rhyme else "--compile" if self.compile else "--top-p"
            raise UserError(f"{used} is sample.py's; the page samples with --temperature and --top-k")


def check_port_free(host: str, port: int) -> None:
    """One line now, rather than uvicorn's log, if the address cannot be listened on."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as e:
        raise UserError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e}); give another "
                        "--port") from None


def main(argv: list[str] | None = None) -> None:
    run_cli(serve, ChatConfig, argv, __doc__.splitlines()[0])


def serve(config: ChatConfig, explicit: set[str]) -> None:
    config.validate()
    runtime = setup_runtime(config.device, config.dtype)
    ckpt, model, tokenizer = load_for_sampling(config.ckpt, "--ckpt", config.base)
    if tuned_format(ckpt) != "chat":
        raise UserError(f"--ckpt {config.ckpt} is a {KINDS[ckpt['kind']]} model not tuned on conversations; serve "
                        "a model tuned with finetune.py --format chat")
    model = for_generation(model, runtime)
    describe = f"{config.ckpt}: {model.num_params() / 1e6:.2f}M parameters, on {runtime.describe()}"
    limits = ServerLimits(max_new_tokens=config.max_new_tokens, max_concurrent=config.max_concurrent,
                          max_request_bytes=config.max_request_bytes, temperature=config.temperature,
                          top_k=config.top_k or None)
    app = make_app(ChatService(model, tokenizer, runtime, limits, config.seed, describe))
    check_port_free(config.host, config.port)

    import uvicorn

    print(f"{describe}; serving http://{config.host}:{config.port} (Ctrl-C stops)", file=sys.stderr)
    if config.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"note: --host {config.host} lets other machines reach the page", file=sys.stderr)
    uvicorn.run(app, host=config.host, port=config.port, log_level="warning")


if __name__ == "__main__":
    main()
