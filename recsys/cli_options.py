"""The options every `recsys` verb shares, and how a verb's configuration is put together."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from recsys.config import Config

ConfigOpt = typer.Option(None, "--config", "-c", help="TOML file with Config sections (see recsys/config.py).")
WorkdirOpt = typer.Option(None, "--workdir", "-w", help="Where everything this run writes goes (default ./work).")
PostersOpt = typer.Option(None, "--posters", help="MovieLens poster folder (<movieId>.jpg), attached as image parts.")
DataOpt = typer.Option(None, "--data", help="Dataset folder: ml-latest-small layout, or the generic format with --source generic.")
SourceOpt = typer.Option(None, "--source", help="movielens (default), generic or synthetic.")
UsersOpt = typer.Option(None, "--max-users", help="Use only the first N users (a quick slice).")
StoreOpt = typer.Option(None, "--online-store", help="sqlite (default) or redis.")
RedisOpt = typer.Option(None, "--redis", help="Redis connection string, e.g. localhost:6390.")
BackendOpt = typer.Option(None, "--embedder", help="local (default, offline) or gemini.")
DimOpt = typer.Option(None, "--dim", help="Embedding dimension (Matryoshka prefix).")
EpochsOpt = typer.Option(None, "--epochs", help="Two-tower max epochs.")
ProtocolsOpt = typer.Option(None, "--protocols", help="Comma-separated: loo,cold,temporal.")


def _config(config, workdir, posters=None, data=None, source=None, max_users=None, online_store=None, redis=None,
            embedder=None, dim=None, epochs=None, protocols=None, quiet: bool = False) -> Config:
    """The run's configuration: the one saved in the work directory by an earlier demo or train (so every verb
    on a work directory uses the same dataset and model settings), with ``--config``'s sections layered on top
    (e.g. an ``[experiment]`` to serve), else ``--config`` or the defaults alone; options on the command line
    override all. Says which dataset it is."""
    saved = Path(workdir or "work") / "config.json"
    base = None
    if saved.exists():
        try:
            base = json.loads(saved.read_text())
        except json.JSONDecodeError as exc:
            from recsys.errors import DataError

            raise DataError(f"{saved} is not valid JSON ({exc}); remove it or pass --config") from exc
        if source and source != base.get("data", {}).get("source"):
            base.pop("data", None)  # another dataset named on the command line: none of the saved one's paths
    cfg = Config.load(
        config, base=base,
        workdir=str(workdir) if workdir else None,
        data={"posters": posters, "path": data, "source": source, "max_users": max_users},
        features={"online_store": online_store, "redis_connection": redis},
        embedder={"backend": embedder, "dim": dim},
        train={"max_epochs": epochs},
        eval={"protocols": protocols.split(",") if protocols else None},
    )
    from recsys.quiet import silence

    silence()
    cfg.workdir.mkdir(parents=True, exist_ok=True)
    if not quiet:
        from recsys.data import describe_source

        where = " + ".join(str(p) for p in ((saved if base is not None else None), config) if p)
        typer.echo(describe_source(cfg) + (f"  [configuration: {where}]" if where else ""), err=True)
    return cfg
