"""Loss-store commands: `hardbatch export` and `hardbatch runs`."""

from __future__ import annotations

import json

import click

from hardbatch.services.redis_server import ENV_URL
from hardbatch.services.store import LossStore

_URL_HELP = f"Redis of the loss store (default: ${ENV_URL})."


def _store(redis_url: str | None) -> LossStore:

    if not redis_url:
        raise click.UsageError(
            f"no loss store configured: pass --redis-url or set {ENV_URL} (an embedded Redis "
            "lives only as long as the command that started it, so there is nothing to read)"
        )
    return LossStore.from_url(redis_url)


@click.command("export")
@click.argument("run")
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="Parquet file for the hardness table (one row per sample).")
@click.option("--log", "with_log", is_flag=True,
              help="Also write the raw loss log still in the store to OUT's .log.parquet.")
@click.option("--redis-url", envvar=ENV_URL, help=_URL_HELP)
@click.option("--timeout", default=60.0, show_default=True,
              help="Seconds allowed for replaying the log.")
def export_cmd(run: str, out: str, with_log: bool, redis_url: str | None, timeout: float) -> None:
    """Write RUN's hardness table (and optionally its loss log) to Parquet.

    Read it back with `hardbatch.services.export.read_export(OUT)`.
    """
    from hardbatch.services.export import export_run
    from hardbatch.services.store import StoreError

    store = _store(redis_url)
    try:
        summary = export_run(store, run, out, log=with_log, timeout_s=timeout)
    except StoreError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"wrote {summary['table']} ({summary['rows']} samples, "
               f"{summary['meta']['applied_records']} records applied)")
    if with_log:
        note = "" if summary["log_complete"] else " (older entries were trimmed by snapshots)"
        click.echo(f"wrote {summary['log']} ({summary['log_rows']} records){note}")


@click.command("runs")
@click.argument("run", required=False)
@click.option("--delete", "delete", metavar="RUN", default=None,
              help="Delete RUN: every key it has in Redis, and its spill files on this machine.")
@click.option("--spill-dir", type=click.Path(file_okay=False), default=None,
              help="Spill-file root the reporters used (default: the private temp folder).")
@click.option("--redis-url", envvar=ENV_URL, help=_URL_HELP)
def runs_cmd(run: str | None, delete: str | None, spill_dir: str | None,
             redis_url: str | None) -> None:
    """List the loss store's runs, show RUN's counters as JSON, or --delete a run."""
    from hardbatch.services.store import StoreError, check_run_name
    from hardbatch.trainer.spill import remove_run_spills

    store = _store(redis_url)
    if delete is not None:
        try:
            check_run_name(delete)
        except StoreError as e:
            raise click.BadParameter(str(e), param_hint="--delete") from None
        existed = store.has_run(delete)
        removed = store.delete_run(delete)
        spills = remove_run_spills(spill_dir, delete)
        if not existed and not removed and not spills:
            raise click.ClickException(f"unknown run {delete!r}")
        click.echo(f"deleted run {delete}: {removed} Redis keys, {spills} spill files")
        return
    if run is None:
        for name in store.runs():
            click.echo(name)
        return
    try:
        click.echo(json.dumps(store.run_info(run).as_dict(), indent=2))
    except StoreError as e:
        raise click.ClickException(str(e)) from None
