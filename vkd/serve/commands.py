"""``vkd serve``: the search API and the web page on an index, under uvicorn."""

from __future__ import annotations

import ipaddress
import os
import time
from pathlib import Path
from typing import Any

import click

from vkd.serve.config import DEFAULT_MAX_IMAGE_PIXELS, DEFAULT_MAX_UPLOAD_BYTES, ServeConfig


def _bytes_option(ctx: click.Context, param: click.Parameter, value: Any) -> int:
    from vkd.indexer.build import parse_bytes

    try:
        parsed = parse_bytes(value)
    except ValueError:
        parsed = None
    if parsed is None or parsed < 1:
        raise click.BadParameter(f"{value!r}: give a size such as 20MB or 5000000")
    return parsed


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _has_torch() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch") is not None and importlib.util.find_spec("transformers") is not None


def _uses_onnx(name: str, prefer: str) -> bool:
    from vkd.export.onnx_encoder import EXPORT_MANIFEST

    path = Path(name).expanduser()
    return (path / EXPORT_MANIFEST).is_file() or (prefer == "onnx" and (path / "onnx" / EXPORT_MANIFEST).is_file())


def preflight(config: ServeConfig) -> list[str]:
    """Check what can be checked before the server starts; returns warnings to print.

    Raises a ClickException naming the fix for what would make every request fail: no index,
    an unreadable manifest, or a model that needs torch in an install without it.
    """
    from vkd.indexer.manifest import MANIFEST_NAME, ManifestError, read_manifest

    index_dir = Path(config.index)
    if not (index_dir / MANIFEST_NAME).is_file():
        raise click.ClickException(
            f"no index at {index_dir} (no {MANIFEST_NAME}). Build one with `vkd index IMAGES --model STUDENT "
            "--teacher TEACHER --out DIR` and pass --index DIR (or run `vkd demo` for the demo's index)")
    try:
        manifest = read_manifest(index_dir)
    except ManifestError as error:
        raise click.ClickException(str(error)) from None
    warnings = []
    if config.prefer == "torch" and not _has_torch():
        raise click.UsageError("--prefer torch needs torch and transformers, which this install lacks (a "
                               "`vkd[serve]` install runs ONNX exports only): use --prefer onnx, or install \"vkd[full]\"")
    if not _has_torch():
        models = [("student", config.student or manifest["student"]["name"], "--student")]
        teacher = config.teacher or (manifest.get("teacher") or {}).get("name")
        if teacher:
            models.append(("teacher", teacher, "--teacher"))
        for role, name, option in models:
            if not _uses_onnx(str(name), config.prefer):
                raise click.UsageError(
                    f"the {role} {name} has no ONNX export ({Path(name) / 'onnx' / 'export.json'}), and this install "
                    f"has no torch (a `vkd[serve]` install runs ONNX exports only). Export it where \"vkd[full]\" is "
                    f"installed: `vkd export {name}` (for a teacher the text tower is what the rerank needs), or "
                    f"pass {option} EXPORT_DIR, or install \"vkd[full]\"")
    images_root = Path(config.images_root or manifest["images_root"])
    if not images_root.is_dir():
        warnings.append(f"the images folder {images_root} is not there: searches work, but /images and /thumbs "
                        "will answer 404; pass --images-root DIR where the images are")
    return warnings


@click.command("serve")
@click.option("--index", "index_dir", type=click.Path(file_okay=False), default=None,
              help="Index directory.  [default: $VKD_INDEX, else the demo's index under $VKD_HOME]")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. Anything but loopback exposes the server: set --api-key.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="Port (0: any free one; the ready line says which).")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Worker processes, each with its own copy of the models.")
@click.option("--api-key", envvar="VKD_API_KEY", default=None, metavar="KEY",
              help="Require this key on /search, /images, /thumbs and /stats (Authorization: Bearer KEY, "
                   "X-API-Key: KEY, or the cookie POST /login sets). /health stays open.  [env: VKD_API_KEY]")
@click.option("--student", default=None, metavar="MODEL",
              help="Student model directory or ONNX export directory.  [default: the index's]")
@click.option("--teacher", default=None, metavar="MODEL",
              help="Teacher for the rerank (its text tower suffices).  [default: the index's]")
@click.option("--prefer", type=click.Choice(["onnx", "torch"]), default="onnx", show_default=True,
              help="Use a model's ONNX export (MODEL/onnx) when it has one; torch otherwise.")
@click.option("--precision", type=click.Choice(["int8", "fp32"]), default=None,
              help="Which files of the ONNX exports to run.  [default: int8 where exported] Dynamic INT8 "
                   "quantises each batch's activations together, so a query's scores move slightly (~1e-3) with "
                   "the queries it is micro-batched with; fp32, or --max-batch 1, makes each answer independent.")
@click.option("--images-root", type=click.Path(file_okay=False), default=None,
              help="Where the indexed images are, when not where the index recorded them (e.g. in a container).")
@click.option("--candidates", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Default stage-1 candidates of a search that does not say.")
@click.option("--max-k", type=click.IntRange(min=1), default=100, show_default=True,
              help="Largest k a request may ask for.")
@click.option("--max-candidates", type=click.IntRange(min=1), default=10_000, show_default=True,
              help="Largest candidates a request may ask for.")
@click.option("--max-upload-bytes", callback=_bytes_option, default=str(DEFAULT_MAX_UPLOAD_BYTES),
              show_default="20MB", help="Largest query image upload (larger: 413), e.g. 20MB.")
@click.option("--max-image-pixels", type=click.IntRange(min=1), default=DEFAULT_MAX_IMAGE_PIXELS,
              show_default=True, help="Largest query image in decoded pixels (decompression bomb guard).")
@click.option("--batch-window-ms", type=click.FloatRange(min=0), default=2.0, show_default=True,
              help="How long a search waits for others to be encoded in one batch with it.")
@click.option("--max-batch", type=click.IntRange(min=1), default=32, show_default=True,
              help="Most searches in one batch.")
@click.option("--reload-interval", type=click.FloatRange(min=0), default=2.0, show_default=True,
              help="Seconds between checks for a newer index committed by `vkd index` (0: never reload).")
@click.option("--thumb-size", type=click.IntRange(16, 2048), default=256, show_default=True,
              help="Longest side of /thumbs images, in pixels.")
@click.option("--thumb-cache", type=click.Path(file_okay=False), default=None,
              help="Folder for thumbnails.  [default: INDEX/thumbs; in memory when not writable]")
@click.option("--root-path", default="", help="URL prefix when a reverse proxy serves this under a sub-path, e.g. /vkd.")
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]), default="info",
              show_default=True, help="uvicorn's log level.")
@click.option("--access-log/--no-access-log", default=True, show_default=True, help="Log every request.")
def serve(index_dir: str | None, host: str, port: int, workers: int, api_key: str | None, student: str | None,
          teacher: str | None, prefer: str, precision: str | None, images_root: str | None, candidates: int,
          max_k: int, max_candidates: int, max_upload_bytes: int, max_image_pixels: int, batch_window_ms: float,
          max_batch: int, reload_interval: float, thumb_size: int, thumb_cache: str | None, root_path: str,
          log_level: str, access_log: bool) -> None:
    """Serve search over HTTP: the API (/search, /images, /thumbs, /health, /stats; described
    at /docs and /openapi.json) and a web page at /.

    The models stay loaded; concurrent searches are encoded in micro-batches; an index
    updated by `vkd index` meanwhile is picked up without a restart. With ONNX exports of
    the student and of the teacher (`vkd export MODEL`), neither torch nor transformers is
    loaded: `pip install "vkd[serve]"` is all the server needs (deploy/README.md).

    \b
    Examples:
      vkd serve                                        # the demo's index on http://127.0.0.1:8000
      vkd serve --index photos.vkd --port 8080
      VKD_API_KEY=$(openssl rand -hex 32) vkd serve --index photos.vkd --host 0.0.0.0
      curl 'http://127.0.0.1:8000/search?q=a+dog+on+a+beach&k=5'
      curl -F image=@query.jpg http://127.0.0.1:8000/search
      vkd search "a dog on a beach" --server http://127.0.0.1:8000
    """
    try:
        import uvicorn
    except ImportError:
        raise click.ClickException('vkd serve needs FastAPI and uvicorn: pip install "vkd[serve]"') from None
    from vkd.paths import default_index_dir
    from vkd.serve.config import CONFIG_ENV

    try:
        config = ServeConfig(
            index=index_dir or str(default_index_dir()), student=student, teacher=teacher, prefer=prefer,
            precision=precision, images_root=images_root, candidates=candidates, max_k=max_k,
            max_candidates=max_candidates, max_upload_bytes=max_upload_bytes, max_image_pixels=max_image_pixels, batch_window_ms=batch_window_ms,
            max_batch=max_batch, reload_interval_s=reload_interval, thumb_size=thumb_size, thumb_cache=thumb_cache,
            api_key=api_key, root_path=root_path,
        )
    except ValueError as error:
        raise click.UsageError(str(error)) from None
    if not is_loopback(host) and api_key is None:
        click.echo(f"warning: listening on {host} without an API key: anyone who can reach this port can search "
                   "the index and read its images. Set --api-key (or VKD_API_KEY), and put a TLS proxy in front "
                   "(deploy/README.md)", err=True)
    for warning in preflight(config):
        click.echo(f"warning: {warning}", err=True)

    options: dict[str, Any] = dict(host=host, port=port, log_level=log_level, access_log=access_log,
                                   root_path=config.root_path, timeout_graceful_shutdown=10)
    if workers > 1:
        # each worker imports the app factory and reads its config from the environment
        os.environ[CONFIG_ENV] = config.to_json()
        click.echo(f"vkd serve: {workers} workers on {_url(host, port)}{config.root_path}/, each loading the models; "
                   "GET /health answers 200 from a worker once its models are loaded", err=True)
        uvicorn.run("vkd.serve.app:app_from_env", factory=True, workers=workers, **options)
        return

    from vkd.serve.app import create_app
    from vkd.serve.engine import SearchEngine

    server: uvicorn.Server | None = None

    def ready(engine: SearchEngine) -> None:
        bound = port
        for _ in range(200):  # the models may load before uvicorn has bound its socket
            if server is not None and server.started:
                break
            time.sleep(0.05)
        if server is not None and server.servers:
            bound = server.servers[0].sockets[0].getsockname()[1]
        described = engine.describe()
        models = described.get("models", {})
        backends = ", ".join(f"{role} {info['backend']}" for role, info in models.items() if info)
        click.echo(f"vkd serve: ready at {_url(host, bound)}{config.root_path}/ ({described.get('live_rows')} images; "
                   f"{backends}; loaded in {engine.load_seconds:.1f} s)", err=True)

    def failed(engine: SearchEngine) -> None:
        if server is not None:
            server.should_exit = True

    engine = SearchEngine(config, on_ready=ready, on_failure=failed)
    server = uvicorn.Server(uvicorn.Config(create_app(config, engine=engine), **options))
    click.echo(f"vkd serve: loading {config.index} on {_url(host, port)}{config.root_path}/ "
               "(GET /health answers 503 until the models are loaded)", err=True)
    server.run()
    if engine.state == "failed":
        raise click.ClickException(engine.not_ready_detail())


def _url(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return f"http://{shown}:{port}"
