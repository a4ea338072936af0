"""Results are never lost or overwritten through links or by a kill (issue 22, first group): a
`.overwritten` that is a link, a folder holding a log.txt of someone else's, a target's subfolder
that is a link, and an `--overwrite` killed after its new run had written files."""
import json
import os

import pytest

from ldm.run_folder import RunFolder, names
from tiny_models import TARGET, TinyExtractor, run_cli, tiny_args, write_tiny_sd

FAST = ["--optim_forward_guidance", "--optim_timesteps", "2"]
SECOND = TARGET.parent / "coffee.jpg"


@pytest.fixture(scope="module")
def sd_files(tmp_path_factory):
    return write_tiny_sd(tmp_path_factory.mktemp("sd"))


def snapshot(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.name != names.LOCK}


def link_aside(folder, elsewhere):
    (folder / names.SET_ASIDE).symlink_to(elsewhere)
    return ["--overwrite"], "is not a folder of this tool (a link or a file)"


def own_log(folder, elsewhere):
    (folder / names.LOG).write_text("my notes\n")
    return [], "log.txt but no finished run or resume state; pass --overwrite"


def linked_subfolder(folder, elsewhere):
    os.symlink(elsewhere, folder / "chelsea")
    return ["--prompt", TARGET, SECOND], "a target's folder is never written through a link"


@pytest.mark.parametrize("make", [link_aside, own_log, linked_subfolder])
def test_nothing_is_written_through_links_or_over_foreign_files(sd_files, tmp_path, capsys, make):
    folder, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "log.txt").write_text("someone else's log\n")
    if make is not linked_subfolder:
        assert run_cli(TinyExtractor, tiny_args(sd_files, folder, *FAST), capsys)[0] == 0
        if make is own_log:
            for path in RunFolder(folder).outputs():
                path.unlink()
    else:
        folder.mkdir()
    extra, message = make(folder, elsewhere)
    before, theirs = snapshot(folder), snapshot(elsewhere)
    args = tiny_args(sd_files, folder, *FAST)
    if "--prompt" in extra:
        args = args[:args.index("--prompt")] + list(map(str, extra)) + args[args.index("--prompt") + 2:]
    else:
        args += extra
    code, _, err = run_cli(TinyExtractor, args, capsys)
    assert code == 2 and message in err, err
    assert snapshot(folder) == before and snapshot(elsewhere) == theirs


def test_a_killed_overwrite_gives_the_finished_run_back(sd_files, tmp_path, capsys):
    """As a SIGKILL leaves it after the new run's first resume state: the old outputs aside (the
    move done), the new run's log and state in the folder."""
    folder = tmp_path / "out"
    assert run_cli(TinyExtractor, tiny_args(sd_files, folder, *FAST), capsys)[0] == 0
    before = snapshot(folder)
    aside = folder / names.SET_ASIDE
    aside.mkdir()
    for path in RunFolder(folder).outputs():
        os.replace(path, aside / path.name)
    (aside / names.SET_ASIDE_DONE).touch()
    (folder / names.LOG).write_text("the killed run's log\n")
    (folder / names.STATE).write_bytes(b"the killed run's state")
    code, _, err = run_cli(TinyExtractor, tiny_args(sd_files, folder, *FAST), capsys)
    assert code == 2 and "already holds a finished run" in err, err
    assert snapshot(folder) == before and not aside.exists()
    assert json.loads((folder / names.METRICS).read_text())["finished"] is True
