"""Results are never lost or overwritten through links or by a kill (issue 22, first group): a
`.overwritten` that is a link, a folder holding a log.txt of someone else's, a target's subfolder
that is a link, and an `--overwrite` killed after its new run had written files."""
import json
import os

import pytest

from ldm.run_folder import RunFolder, names
from tiny_models import REPO, TARGET, TinyExtractor, run_cli, stopped_run, tiny_args, write_tiny_sd

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
    return [], "log.txt but no run of this tool (a run writes target_features.safetensors first); pass --overwrite"


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


# --- crafted resume states --------------------------------------------------------------------

def edit_state(path, change) -> None:
    """Rewrite a state file with `change(sampler, run)` applied to its JSON records."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(str(path), "pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    sampler, run = json.loads(metadata["sampler"]), json.loads(metadata["run"])
    change(sampler, run)
    save_file(tensors, str(path), metadata={**metadata, "sampler": json.dumps(sampler), "run": json.dumps(run)})


@pytest.mark.parametrize("change, message", [
    (lambda s, r: s["best"][0].update(score=float("nan")), "best.0 has the score nan"),
    (lambda s, r: s["best"][0].update(score="high"), "could not convert string to float: 'high'"),
    (lambda s, r: r.update(log_bytes=-1), "log_bytes is -1"),
    (lambda s, r: r.update(elapsed_s="x"), "elapsed_s is 'x'"),
    (lambda s, r: r.update(resumes=5), "resumes is 5"),
    (lambda s, r: r.update(fingerprint=[1]), "fingerprint is [1]"),
])
def test_crafted_resume_states_are_refused(sd_files, tmp_path, capsys, monkeypatch, change, message):
    folder = tmp_path / "out"
    args = tiny_args(sd_files, folder, "--optim_forward_guidance", "--optim_timesteps", "6")
    assert stopped_run(TinyExtractor, args, capsys, monkeypatch)[0] == 130
    edit_state(folder / names.STATE, change)
    before = snapshot(folder)
    code, _, err = run_cli(TinyExtractor, [*args, "--resume"], capsys)
    assert code == 2 and "cannot resume" in err and message in err, err
    assert snapshot(folder) == before


# --- names and paths, and inputs that would never end ---------------------------------------

@pytest.mark.parametrize("where, value, message", [
    ("--optim_folder", "x" * 300, "300 bytes in one name"),
    ("--optim_folder", "/".join(["y" * 200] * 25), "5024 in all, more than a file system takes"),
    ("--optim_folder", os.fsdecode(b"runs/\xff\xfe"), "the name is not valid UTF-8"),
    ("--prompt", os.fsdecode(b"/tmp/\xff.png"), "is not valid UTF-8 (a file name of other bytes)"),
    ("--prompt_file", "/dev/zero", "is not a regular file of at most 16 MiB"),
    ("--H", "65536", "--H: 65536 is not from 1 to 8,192"),
])
def test_names_paths_and_endless_inputs_are_one_error_line(sd_files, tmp_path, capsys, monkeypatch,
                                                           where, value, message):
    monkeypatch.chdir(tmp_path)
    args = tiny_args(sd_files, tmp_path / "out", *FAST)
    if where == "--prompt_file":
        args = args[:args.index("--prompt")] + args[args.index("--prompt") + 2:] + [where, value]
    else:
        args[args.index(where) + 1] = value
    code, _, err = run_cli(TinyExtractor, args, capsys)
    assert code == 2 and err.startswith("error:") and message in err, err
    assert not any(tmp_path.iterdir())


def test_two_runs_started_into_one_new_folder_at_once(sd_files, tmp_path, capsys, monkeypatch):
    """Both saw the folder missing; the one that lost the lock leaves the winner's folder alone."""
    folder = RunFolder(tmp_path / "out")
    folder.create()
    folder.lock()                                   # the winner
    monkeypatch.setattr(RunFolder, "create", lambda self: True)
    try:
        code, _, err = run_cli(TinyExtractor, tiny_args(sd_files, folder.path, *FAST), capsys)
        assert code == 2 and "is being written by process" in err, err
        assert (folder / names.LOCK).is_file()
    finally:
        folder.unlock()


@pytest.mark.slow
@pytest.mark.parametrize("limit, code, words", [
    (6000, 0, "warning: could not write the resume state"),    # the state does not fit: the run goes on
    (2000, 2, "error: cannot write"),                         # nor does an output: one error line
])
def test_a_file_size_limit_is_a_warning_for_the_state_and_one_error_line_for_outputs(sd_files, tmp_path,
                                                                                     limit, code, words):
    import resource
    import subprocess
    import sys
    args = tiny_args(sd_files, tmp_path / "out", "--optim_forward_guidance", "--optim_timesteps", "4",
                     "--save_every", "1")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, str(sd_files / "tiny_guided.py"), *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=300,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert done.returncode == code and words in done.stdout + done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
