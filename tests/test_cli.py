"""The command line: help that reads as a table, every option described, user errors in one line, a work
directory's saved configuration reused; and the house rules the layout keeps (no import circles, sizes)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import click
import pytest
import typer
from typer.testing import CliRunner

from recsys.cli import app as cli

ROOT = Path(__file__).resolve().parents[1]


def commands(group: click.Group, path: tuple[str, ...] = ()):
    """(words, click command) for every leaf verb."""
    for name, sub in group.commands.items():
        if isinstance(sub, click.Group):
            yield from commands(sub, path + (name,))
        else:
            yield path + (name,), sub


def test_top_level_help_lists_every_verb_on_its_own_line_and_every_option_is_described():
    out = CliRunner().invoke(cli, ["--help"]).output
    table = {m.group(1) for m in re.finditer(r"^ {2,4}([a-z][a-z-]*(?: [a-z][a-z-]*)?) {2,}\S", out, re.M)}
    verbs = {" ".join(words) for words, _ in commands(typer.main.get_command(cli))}
    assert verbs <= table, f"verbs missing from the help table: {sorted(verbs - table)}"
    for words, cmd in commands(typer.main.get_command(cli)):
        res = CliRunner().invoke(cli, [*words, "--help"])
        assert res.exit_code == 0 and "Usage" in res.output, (words, res.output)
        assert (cmd.help or "").strip(), f"recsys {' '.join(words)} has no description"
        bare = [p.name for p in cmd.params if isinstance(p, click.Option) and not (p.help or "").strip()]
        assert not bare, f"recsys {' '.join(words)}: options without help: {bare}"


def test_evaluate_takes_models_or_embedder_as_subcommands_each_with_its_own_options():
    models = CliRunner().invoke(cli, ["evaluate", "models", "--help"]).output
    embedder = CliRunner().invoke(cli, ["evaluate", "embedder", "--help"]).output
    assert "--protocols" in models and "--fsdd" not in models
    assert "--fsdd" in embedder and "--protocols" not in embedder
    assert CliRunner().invoke(cli, ["evaluate", "sideways"]).exit_code == 2


def test_simulate_rejects_bad_arms_with_a_reason():
    result = CliRunner().invoke(cli, ["simulate", "--arms", "champion=sim-champion"])
    assert result.exit_code == 2 and "two arms" in result.output
    result = CliRunner().invoke(cli, ["simulate", "--arms", "champion"])
    assert result.exit_code == 2 and "expected name=alias" in result.output
    result = CliRunner().invoke(cli, ["simulate", "--mode", "sideways"])
    assert result.exit_code == 2 and "interleave" in result.output


def test_user_errors_print_one_line_and_exit_2_and_debug_shows_the_traceback(tmp_path, capsys):
    from recsys.cli import main
    from recsys.errors import DataError

    with pytest.raises(SystemExit) as exit_:
        main(["embed", "--workdir", str(tmp_path / "w"), "--source", "generic"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert "error: data.path must name the folder of a generic-format dataset" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--config", str(tmp_path / "missing.toml")])
    assert exit_.value.code == 2 and "no configuration file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["train-embedder", "--workdir", str(tmp_path / "w"), "--from-weights", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "not a weights folder" in err and "Traceback" not in err
    with pytest.raises(DataError):
        main(["embed", "--workdir", str(tmp_path / "w"), "--source", "generic", "--debug"])


def test_a_work_directory_reuses_its_saved_configuration_and_says_which_dataset(tmp_path, capsys):
    from recsys.cli import _config
    from recsys.config import Config

    data = tmp_path / "data"
    work = tmp_path / "w"
    work.mkdir()
    saved = Config.model_validate({"workdir": str(work), "data": {"source": "synthetic", "path": str(data)},
                                   "train": {"max_epochs": 3}})
    (work / "config.json").write_text(saved.model_dump_json())
    cfg = _config(None, work, epochs=1)  # e.g. `recsys evaluate --workdir w --epochs 1`
    assert cfg.data.source == "synthetic" and cfg.data.path == data and cfg.train.max_epochs == 1
    err = capsys.readouterr().err
    assert f"dataset: synthetic ({data})" in err and str(work / "config.json") in err
    other = _config(None, work, source="movielens")  # told otherwise: the saved dataset's paths do not leak
    assert other.data.source == "movielens" and other.data.path is None and other.train.max_epochs == 3


def imports(path: Path) -> set[str]:
    """Project modules ``path`` imports (at any depth: an import inside a function is still a dependency)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m.split(".")[0] in ("recsys", "features", "training", "serving")}


def modules() -> dict[str, Path]:
    return {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
            for top in ("recsys", "features", "training", "serving") for p in (ROOT / top).rglob("*.py")}


def test_the_layers_point_one_way_and_nothing_imports_in_a_circle():
    mods = modules()
    graph = {m: {i for i in imports(p) if i in mods} for m, p in mods.items()}
    for m, deps in graph.items():  # the core reaches up only from the flows and the CLI
        if m.startswith("recsys.") and not m.startswith(("recsys.flows", "recsys.cli")):
            up = sorted(d for d in deps if d.split(".")[0] in ("features", "training", "serving"))
            assert not up, f"{m} (core) imports {up}"
        if m.startswith("training"):
            assert not [d for d in deps if d.startswith("serving")], f"{m} imports serving"
        if m.startswith("serving"):
            assert not [d for d in deps if d.startswith("training")], f"{m} imports training"
    # no circles: depth-first search for a back edge (a package's __init__ re-exporting its modules is not one)
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]):
        state[m] = 1
        for d in graph[m]:
            if m.startswith(d + ".") or d.startswith(m + "."):
                continue
            if state.get(d) == 1:
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])


def test_no_file_over_500_lines_and_no_flow_or_pipeline_function_over_80():
    sizes = {p: len(p.read_text().splitlines()) for p in modules().values()}
    big = {str(p.relative_to(ROOT)): n for p, n in sizes.items() if n > 500}
    assert not big, f"files over 500 lines: {big}"
    pipeline = [ROOT / "recsys" / f for f in ("embed/catalog.py", "eval/inputs.py", "eval/compare.py", "progress.py")]
    for p in [*(ROOT / "recsys" / "flows").glob("*.py"), *pipeline]:
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                assert n <= 80, f"{p.relative_to(ROOT)}:{node.lineno} {node.name} is {n} lines"


def test_cold_overrides_live_in_one_section_and_the_former_flat_names_still_read():
    from recsys.config import Config

    cfg = Config.model_validate({"train": {"cold": {"id_dropout": 0.5, "content_match": False, "item_content": "full"}}})
    flat = Config.model_validate({"train": {"cold_id_dropout": 0.5, "cold_content_match": False, "cold_item_content": "full"}})
    assert cfg.train.cold == flat.train.cold and cfg.train.cold.item_content == "full"
    cold = cfg.train.for_protocol("cold")
    assert cold.id_dropout == 0.5 and not cold.content_match
    assert cfg.with_train(cold_id_dropout=1.0).train.for_protocol("cold").id_embeddings is False
    assert Config().with_train(newest_items=3).train.newest_items == 3
    with pytest.raises(ValueError, match="item_content"):
        Config.model_validate({"train": {"cold": {"item_content": "sideways"}}})
    saved = Config.model_validate_json(flat.model_dump_json())  # a work directory's config.json round-trips
    assert saved.train.cold == flat.train.cold and "cold_id_dropout" not in flat.model_dump_json()


def test_a_config_file_layers_on_the_work_directorys_saved_configuration(tmp_path, capsys):
    """`recsys serve -c exp.toml --workdir w`: the [experiment] is added to what w was trained with, not a
    replacement of it (the dataset and model settings stay)."""
    from recsys.cli import _config
    from recsys.config import Config

    work = tmp_path / "w"
    work.mkdir()
    saved = Config.model_validate({"workdir": str(work), "data": {"source": "synthetic", "path": str(tmp_path / "d")},
                                   "train": {"max_epochs": 3, "cold": {"id_dropout": 0.5}}, "serve": {"k": 7}})
    saved.save()
    toml = tmp_path / "exp.toml"
    toml.write_text('[experiment]\nname = "e1"\narms = [{name = "a", share = 0.9}, {name = "b", share = 0.1}]\n'
                    '[serve]\nport = 8123\n[train.cold]\ncontent_match = false\n')
    cfg = _config(toml, work)
    assert cfg.data.source == "synthetic" and cfg.train.max_epochs == 3 and cfg.serve.k == 7  # kept
    assert cfg.experiment.name == "e1" and [a.share for a in cfg.experiment.arms] == [0.9, 0.1] and cfg.serve.port == 8123
    assert cfg.train.cold.id_dropout == 0.5 and cfg.train.cold.content_match is False  # nested tables merge
    assert f"{work / 'config.json'} + {toml}" in capsys.readouterr().err
