"""`hardbatch serve`, `hardbatch hardness` and `hardbatch top`."""

from __future__ import annotations

import ipaddress
import json
import signal
import sys
from typing import Any

import click

DEFAULT_SERVICE = "http://127.0.0.1:8000"

_service_option = click.option(
    "--service", envvar="HARDBATCH_SERVICE_URL", default=DEFAULT_SERVICE, show_default=True,
    help="Sampler service URL (env HARDBATCH_SERVICE_URL).",
)
_token_option = click.option(
    "--token", envvar="HARDBATCH_API_TOKEN", default=None,
    help="Bearer token, when the service needs one (env HARDBATCH_API_TOKEN).",
)


@click.command("serve")
@click.option("--host", default=None, help="Address to listen on [env HARDBATCH_HOST; 127.0.0.1].")
@click.option("--port", type=int, default=None, help="Port [env HARDBATCH_PORT; 8000].")
@click.option("--redis-url", default=None,
              help="Redis with the loss store [env HARDBATCH_REDIS_URL; none: start one here].")
@click.option("--auth-reads/--no-auth-reads", default=None,
              help="Make read endpoints need the token too [env HARDBATCH_AUTH_READS].")
@click.option("--insecure", is_flag=True,
              help="Allow listening on a non-loopback address without HARDBATCH_API_TOKEN.")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug"]))
def serve_cmd(host: str | None, port: int | None, redis_url: str | None,
              auth_reads: bool | None, insecure: bool, log_level: str) -> None:
    """Run the sampler service (REST hardness queries and batch plans) under uvicorn.

    Every setting also comes from HARDBATCH_* environment variables (see
    services/core/config.py); the token only from HARDBATCH_API_TOKEN, so it never shows in a
    process list. Listening beyond loopback needs the token (or --insecure). SIGTERM and
    SIGINT stop the service and the Redis it started, if it started one.
    """
    import uvicorn
    from pydantic import ValidationError

    from hardbatch.services.core.config import Settings
    from hardbatch.services.main import create_app
    from hardbatch.services.redis_server import redis_url_or_embedded

    given = {"host": host, "port": port, "redis_url": redis_url, "auth_reads": auth_reads}
    overrides: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as e:
        # The reasons alone: pydantic's own text adds a type tag and a link per error.
        raise click.UsageError("; ".join(
            ": ".join([*(f"HARDBATCH_{str(x).upper()}" for x in err["loc"][:1]),
                       str(err["msg"]).removeprefix("Value error, ")])
            for err in e.errors())) from None
    if not insecure and settings.token() is None and not _loopback(settings.host):
        raise click.UsageError(
            f"refusing to listen on {settings.host} without a token: anyone who reaches it "
            "could change plan configs and delete runs. Set HARDBATCH_API_TOKEN, listen on "
            "127.0.0.1, or pass --insecure")
    # uvicorn stops on SIGTERM, then raises the signal again once its own handler is gone:
    # with the default handler that kills the process before the embedded Redis is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with redis_url_or_embedded(settings.redis_url, tcp=False) as url:
        if settings.redis_url is None:
            click.echo(f"no Redis configured: started one at {url}", err=True)
        settings = settings.model_copy(update={"redis_url": url})
        uvicorn.run(create_app(settings), host=settings.host, port=settings.port,
                    log_level=log_level, access_log=log_level == "debug")


@click.command("hardness")
@click.argument("run")
@click.argument("sample_id", type=click.IntRange(min=0))
@_service_option
@_token_option
def hardness_cmd(run: str, sample_id: int, service: str, token: str | None) -> None:
    """Print the hardness record of sample SAMPLE_ID in RUN."""
    from hardbatch.services.client import SamplerClient, SamplerError

    with SamplerClient(service, token=token) as client:
        try:
            rec = client.sample(run, sample_id)
        except SamplerError as e:
            raise click.ClickException(str(e)) from None
    click.echo(json.dumps(rec, indent=2))


@click.command("top")
@click.argument("run")
@click.option("-k", "k", type=click.IntRange(min=1), default=20, show_default=True,
              help="How many samples.")
@click.option("--easiest", is_flag=True, help="The easiest instead of the hardest.")
@click.option("--by", type=click.Choice(["ema", "last_loss"]), default="ema", show_default=True,
              help="Rank by moving-average loss or by the last loss.")
@_service_option
@_token_option
def top_cmd(run: str, k: int, easiest: bool, by: str, service: str, token: str | None) -> None:
    """Print the K hardest (or easiest) samples of RUN scored so far."""
    from hardbatch.services.client import SamplerClient, SamplerError
    from hardbatch.trainer.streaming import fixed

    with SamplerClient(service, token=token) as client:
        try:
            rows = client.top(run, k=k, order="easiest" if easiest else "hardest", by=by)
        except SamplerError as e:
            raise click.ClickException(str(e)) from None
    click.echo(f"{'id':>12} {'ema':>10} {'last_loss':>10} {'seen':>6} {'kept':>6} {'step':>8}")
    for r in rows:
        click.echo(f"{r['id']:>12} {fixed(r['ema'], 10)} {fixed(r['last_loss'], 10)} "
                   f"{r['seen']:>6} {r['kept']:>6} {r['last_step']:>8}")
    if not rows:
        click.echo("(no sample scored yet)")



def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
