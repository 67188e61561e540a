"""`recsys experiment prepare|report` and `recsys simulate`: online experiments on the command line."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import polars as pl
import typer

from recsys.cli_options import ConfigOpt, DataOpt, EpochsOpt, PostersOpt, SourceOpt, UsersOpt, WorkdirOpt, _config


experiment_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                              help="Online experiments: train the simulation's arms (prepare), read the logs (report).")


def _arms(spec: str):
    """"champion=sim-champion,challenger=sim-challenger:0.3" -> ArmConfigs (alias, or vN for a version)."""
    from recsys.config import ArmConfig

    arms, shares_given = [], False
    for chunk in [c.strip() for c in spec.split(",") if c.strip()]:
        name, sep, target = chunk.partition("=")
        if not sep or not name or not target:
            raise typer.BadParameter(f"arm {chunk!r}: expected name=alias (or name=vN, optionally :share)", param_hint="--arms")
        target, _, share = target.partition(":")
        shares_given |= bool(share)
        version = target[1:] if target[:1] == "v" and target[1:].isdigit() else None
        arms.append(ArmConfig(name=name, alias=None if version else target, version=version,
                              share=float(share) if share else 1.0))
    if len(arms) < 2:
        raise typer.BadParameter("an experiment needs two arms or more", param_hint="--arms")
    if not shares_given:
        for a in arms:
            a.share = 1.0 / len(arms)
    return arms


@experiment_app.command("prepare")
def experiment_prepare(
    config: Optional[Path] = ConfigOpt, workdir: Optional[Path] = WorkdirOpt, posters: Optional[Path] = PostersOpt,
    data: Optional[Path] = DataOpt, source: Optional[str] = SourceOpt, max_users: Optional[int] = UsersOpt,
    epochs: Optional[int] = EpochsOpt,
    challenger: list[str] = typer.Option(["train.id_embeddings=true"], help="section.field=value overrides that make the challenger (repeatable)."),
    split: str = typer.Option("holdout", help="holdout (each user's last eval.holdout_share of interactions) or temporal (a global time cut)."),
):
    """Train the simulation's two arms on the interactions before the held-out period only (so it is really
    unseen) and register them as @sim-champion and @sim-challenger; `recsys simulate` replays that period."""
    from recsys.flows.simulate import prepare

    cfg = _config(config, workdir, posters, data, source, max_users=max_users, epochs=epochs)
    try:
        prepare(cfg, challenger, split)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2)


def simulate(
    config: Optional[Path] = ConfigOpt, workdir: Optional[Path] = WorkdirOpt, posters: Optional[Path] = PostersOpt,
    data: Optional[Path] = DataOpt, source: Optional[str] = SourceOpt, max_users: Optional[int] = UsersOpt,
    name: str = typer.Option("ab", help="The run's name: logs go to <workdir>/experiments/<name>/logs."),
    arms: str = typer.Option("champion=sim-champion,challenger=sim-challenger",
                             help="name=alias (or name=vN), comma-separated, each optionally :share; equal shares by default. "
                                  "An A/A run names one alias twice."),
    mode: str = typer.Option("ab", help="ab, or interleave (team draft of the first two arms in each reply)."),
    explore: str = typer.Option("none", help="none, or softmax (sample the shown list; log propensities)."),
    temperature: float = typer.Option(0.05, help="Softmax temperature of the exploration."),
    k: int = typer.Option(10, help="Items per reply."),
    eta: float = typer.Option(0.0, help="Position bias of the click model: P(click | relevant) = (1/position)^eta."),
    seed: int = typer.Option(0, help="Seed of the click model's draws."),
    salt: Optional[str] = typer.Option(None, help="Assignment salt (default: sim-<name>)."),
    sim_users: Optional[int] = typer.Option(None, help="Replay only the first N arriving users."),
    url: Optional[str] = typer.Option(None, help="Drive this running service instead of starting one."),
):
    """Replay the dataset's held-out period (the split `experiment prepare` trained the arms for) through the
    real service as an online experiment: users arrive at their real times, engage with shown items they
    really went on to use."""
    from recsys.flows.simulate import simulate as run_simulation

    if mode not in ("ab", "interleave") or explore not in ("none", "softmax"):
        raise typer.BadParameter("mode is ab or interleave; explore is none or softmax")
    cfg = _config(config, workdir, posters, data, source, max_users=max_users)
    run = run_simulation(cfg, name, _arms(arms), mode=mode, explore=explore, temperature=temperature, k=k, eta=eta,
                         seed=seed, salt=salt, max_users=sim_users, url=url)
    raise typer.Exit(1 if run.errors else 0)


@experiment_app.command("report")
def experiment_report(
    logs: Path = typer.Option(..., "--logs", help="An experiment folder (<workdir>/experiments/<name>) or its logs/ folder."),
    out: Optional[Path] = typer.Option(None, "--out", help="Where report.md and its figures go (default: <logs>/report)."),
    control: Optional[str] = typer.Option(None, help="The control arm (default: the first)."),
    interleaving: Optional[Path] = typer.Option(None, help="An interleaved run of the same arms (adds the users-needed comparison)."),
    off_policy: Optional[Path] = typer.Option(None, "--off-policy", help="A run with exploration (adds IPS / SNIPS / DR)."),
    truth: Optional[Path] = typer.Option(None, help="A greedy run of the target policy: the off-policy estimates' ground truth."),
):
    """Write a markdown report with figures: split check, per-arm metrics, differences with intervals, CUPED,
    segments, A/A calibration, power; optionally interleaving and off-policy estimates."""
    from recsys.experiments.analysis import load
    from recsys.experiments.report import write_report
    from recsys.quiet import silence

    silence()
    try:
        d = load(logs)
        path = write_report(d, out or d.folder / "report", control=control,
                            interleaved=load(interleaving) if interleaving else None,
                            explored=load(off_policy) if off_policy else None, truth=load(truth) if truth else None)
    except (FileNotFoundError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2)
    typer.echo(f"report: {path}")


@experiment_app.command("plan")
def experiment_plan(
    logs: Path = typer.Option(..., "--logs", help="Logs of the service from before the launch (any arms; one policy is best)."),
    mde: float = typer.Option(0.05, help="The smallest relative change worth detecting (0.05: 5% of the mean)."),
    metric: str = typer.Option("clicks", help="The primary metric: clicks, hit, ndcg or engagement_rate (per user)."),
    alpha: float = typer.Option(0.05, help="Two-sided error rate."),
    power: float = typer.Option(0.8, help="Probability of detecting a change of the MDE."),
    shares: str = typer.Option("0.5,0.5", help="The planned arms' shares, comma-separated (e.g. 0.9,0.1)."),
):
    """Before launch: from historical logs, the users a planned experiment needs per day of running and the first
    day it has them (fixed horizon; the sequential test needs somewhat more)."""
    from recsys.experiments.analysis import load
    from recsys.experiments.decision import plan

    try:
        split = tuple(float(s) for s in shares.split(","))
        table = plan(load(logs), mde, metric, alpha, power, split)
    except (FileNotFoundError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2)
    for row in table.iter_rows(named=True):
        typer.echo(f"day {row['day']:>3}: {row['users']:>8,} users, mean {row['mean']:.4f}, sd {row['sd']:.4f}, "
                   f"needed {row['needed'] if row['needed'] is not None else '-':>8} {'<- enough' if row['enough'] else ''}")
    ready = table.filter(pl.col("enough"))
    typer.echo(f"-> read it after day {ready['day'][0]} ({ready['needed'][0]:,} users)" if ready.height else
               f"-> {table['day'].max()} days of such traffic are not enough for a {mde:.1%} change; plan a longer run "
               "or a larger MDE")


@experiment_app.command("traffic")
def experiment_traffic(
    url: str = typer.Option(..., help="The running service (e.g. http://127.0.0.1:8000), serving the experiment."),
    users: int = typer.Option(500, help="Simulated users."),
    days: int = typer.Option(14, help="Days of traffic (simulated time: it runs in seconds to minutes)."),
    mean_requests: float = typer.Option(4.0, help="Requests per user over the period (1 to 20, heavy-tailed)."),
    effect: list[str] = typer.Option([], help="arm=relative click lift planted in that arm (repeatable), e.g. treatment=0.1."),
    eta: float = typer.Option(1.0, help="Position bias: position p is examined with probability 1/p^eta."),
    seed: int = typer.Option(0, help="Seed of the users and their clicks."),
    api_key: Optional[str] = typer.Option(None, "--api-key", help="The service's API key (X-API-Key), if it has keys."),
    out: Optional[Path] = typer.Option(None, help="Write the spec and the counts to OUT/traffic.json."),
):
    """Drive a running service with returning users over several days (the service assigns arms and writes
    the logs): test traffic for an experiment before real users see it."""
    from recsys.experiments.traffic import TrafficSpec, drive

    lifts = {}
    for e in effect:
        arm, sep, lift = e.partition("=")
        if not sep:
            raise typer.BadParameter(f"{e!r}: expected arm=lift", param_hint="--effect")
        lifts[arm] = float(lift)
    run = drive(url, TrafficSpec(users=users, days=days, mean_requests=mean_requests, effect=lifts, eta=eta, seed=seed),
                headers={"X-API-Key": api_key} if api_key else None, out=out)
    typer.echo(f"{run.requests:,} requests, {run.clicks:,} clicks, {run.errors:,} errors; arms {run.arms}")
    raise typer.Exit(1 if run.errors else 0)
