"""`trtglm serve`: a build's backend, its generation loop and the HTTP app, on a socket, under uvicorn."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import TrtglmError, UsageError
from .app import Served, create_app
from .metrics import Metrics
from .scheduler import Scheduler, ServeOptions


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8000  # 0: any free port (Server.url says which)
    backend: str = "auto"  # auto, trt or ort
    api_key: str | None = None
    model_name: str | None = None  # default: the build directory's name
    access_log: bool = False


class Server:
    """Opened: the backend loaded, the loop running, the socket listening (clients may connect at once, they
    are answered once `run` starts). `run` serves until SIGINT/SIGTERM; `close` stops the loop and the backend."""

    def __init__(self, build_dir: str | Path, settings: ServerSettings = ServerSettings(),
                 options: ServeOptions = ServeOptions()):
        from ..model.tokenizer import load_text
        from ..runtime.backends import open_backend

        if options.max_batch < 1 or options.max_queue < 0:
            raise UsageError("--max-batch must be at least 1 and --max-queue at least 0")
        text = load_text(build_dir)
        # ONNX Runtime's threads sleep between steps: the HTTP side runs on the same cores
        self.backend, self.backend_line = open_backend(build_dir, settings.backend, spin=False)
        try:
            reason = self.backend.admits(options.max_batch, 1, 1)
            if reason:
                raise UsageError(f"--max-batch {options.max_batch}: {reason}")
            metrics = Metrics()
            self.scheduler = Scheduler(self.backend, options, metrics)
            name = settings.model_name or Path(build_dir).resolve().name
            self.served = Served(self.scheduler, text, name, self.backend_line, settings.api_key, metrics)
            self.app = create_app(self.served)
            self.socket = _listen(settings.host, settings.port)
        except BaseException:
            self.backend.close()
            raise
        self.settings = settings
        self.scheduler.start()

    @property
    def url(self) -> str:
        host, port = self.socket.getsockname()[:2]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}"

    def run(self) -> None:
        import uvicorn

        config = uvicorn.Config(self.app, log_level="warning", access_log=self.settings.access_log,
                                timeout_graceful_shutdown=5)
        uvicorn.Server(config).run(sockets=[self.socket])

    def close(self) -> None:
        self.scheduler.stop()
        self.socket.close()
        self.backend.close()


def _listen(host: str, port: int) -> socket.socket:
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server((host, port), family=family, backlog=2048)
    except OSError as e:
        raise TrtglmError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
