"""Figures: mosaics of finished runs, logs and score curves (ldm/figures.py and
ldm/cli/figures.py, scripts/make_figure.py's), on fake run folders and on real toy runs."""
import json
import math
from pathlib import Path

import pytest
from PIL import Image

from ldm.cli import figures as make_figure
from ldm.figures import FigureError, kind_of, mosaic_layout, plot_log, read_log, run_mosaic
from ldm.run_folder import RunFolderError, collect_runs, load_run
from ldm.scorelog import Improved, Score, format_line

REPO = Path(__file__).resolve().parents[1]

RED, BLUE, GREEN = (255, 0, 0), (0, 0, 255), (0, 160, 0)
GREY = (208, 208, 208)

RECORDS = [
    Score(0, 999, 0, "estimate", 10.0, 0.5), Improved(0, -math.inf, -10.0),
    Score(0, 999, 0, "guided", 8.0, 0.6), Score(0, 999, 1, "estimate", 6.0, 0.7),
    Score(0, 999, 1, "guided", 5.0, 0.75), Score(0, 999, 1, "backward_iteration", 4.5, 0.77, 0),
    Score(0, 999, 1, "backward", 4.0, 0.8, 1), Score(0, 999, 1, "z_prev", 7.0, 0.65),
    Improved(0, -math.inf, -7.0, "z_prev"), Score(0, 500, 0, "estimate", 2.0, 0.9),
    Score(0, 500, 0, "guided", 1.0, 0.95), Improved(0, -4.0, -1.0),
    Score(0, 0, 0, "estimate", 0.5, 0.98), Score(0, 0, 0, "guided", 0.25, 0.99),
    Score(0, -1, None, "final", 0.25, 0.99)]
TAIL = "Elapsed time = 1.5 sec\nRun options: Namespace(prompt='a.png', seed=42)\n"
LOG_LINES = "".join(format_line(r) + "\n" for r in RECORDS) + TAIL
OLD_LOG_LINES = "".join(format_line(r, cosine=False) + "\n" for r in RECORDS) + TAIL   # no cosine


def run_cli(argv, capsys):
    code = make_figure.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def fake_run(folder: Path, extractor: str, target: dict | None = None, *, finished=True,
             final=RED, best=BLUE, log=LOG_LINES, size=16) -> Path:
    """A run folder as guided_run writes it: metrics.json, out_img.png, the best PNG, log.txt."""
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), final).save(folder / "out_img.png")
    best_file = None
    if best is not None:
        best_file = "out_img_best_t_500_rec_0.5_bk_-1_sim_-1.0.png"
        Image.new("RGB", (size, size), best).save(folder / best_file)
    metrics = {"finished": finished, "target": target or {"kind": "text", "source": "a red circle"},
               "extractor": extractor, "seed": 42, "image_size": [size, size], "settings": {}}
    if finished:
        metrics["final"] = {"file": "out_img.png", "squared_distance": 0.25, "cosine": 0.99,
                            "reloaded_png": {"squared_distance": 0.5, "cosine": 0.98}}
        metrics["best"] = best_file and {"file": best_file, "squared_distance": 0.2, "cosine": 0.991}
    else:
        metrics.update(stopped={"reason": "SIGINT"}, resume_command="python x.py --resume")
    (folder / "metrics.json").write_text(json.dumps(metrics))
    (folder / "log.txt").write_text(log)
    return folder


@pytest.fixture
def target_image(tmp_path) -> dict:
    path = tmp_path / "targets" / "green.png"
    path.parent.mkdir()
    Image.new("RGB", (20, 20), GREEN).save(path)
    return {"kind": "image", "source": str(path)}


def centre(image: Image.Image, box, cell):
    return image.getpixel((box[0] + cell // 2, box[1] + cell // 2))


# --------------------------------------------------------------------------- mosaics

def test_mosaic_one_row_per_target_and_a_column_pair_per_model(tmp_path, target_image):
    study = tmp_path / "study"
    fake_run(study / "a" / "img", "resnet50", target_image)
    fake_run(study / "a" / "txt", "resnet50")
    fake_run(study / "b" / "img", "vit_h14", target_image, final=BLUE, best=None)
    runs, skipped = collect_runs([study])
    assert skipped == [] and len(runs) == 3
    cell = 40
    layout = mosaic_layout(runs, cell)
    assert layout.groups == ["resnet50", "vit_h14"]
    assert len(layout.rows) == 2 and len(layout.groups) * len(layout.images) + 1 == 5   # target + 2 models x (final, best)
    assert [t["target"]["kind"] for t in layout.targets] == ["image", "text"]
    image = run_mosaic(runs, cell)
    assert image.size == layout.size
    assert image.width >= 5 * cell and image.height >= 2 * cell
    assert centre(image, layout.box(0, 0), cell) == GREEN        # the target image
    assert centre(image, layout.box(0, 1), cell) == RED          # resnet50 final
    assert centre(image, layout.box(0, 2), cell) == BLUE         # resnet50 best
    assert centre(image, layout.box(0, 3), cell) == BLUE         # vit final
    assert centre(image, layout.box(1, 3), cell) != RED          # vit has no run for the text target
    assert layout.caption_lines == 2 and mosaic_layout(runs, 200).caption_lines == 1
    assert run_mosaic(runs, cell, reloaded=False).size == layout.size
    assert layout.reloaded                                        # the saved PNGs' numbers by default
    assert mosaic_layout(runs, 200).caption_lines == 1


def test_runs_sharing_a_label_share_columns_and_repeat_rows(tmp_path, target_image):
    for seed in ("s1", "s2"):
        fake_run(tmp_path / seed, "toy_shape", target_image)
    runs, _ = collect_runs([tmp_path / "s1", tmp_path / "s2"])
    layout = mosaic_layout(runs, 32)
    assert layout.groups == ["toy_shape"] and len(layout.rows) == 2   # two seeds, two rows
    split = mosaic_layout(runs, 32, labels=["seed 1", "seed 2"], images=["final"])
    assert split.groups == ["seed 1", "seed 2"] and len(split.rows) == 1 and len(split.groups) * len(split.images) + 1 == 3
    with pytest.raises(FigureError, match="3 labels for 2 runs"):
        mosaic_layout(runs, 32, labels=["a", "b", "c"])


def test_multi_target_folders_keep_the_prompt_order_and_paths_match(tmp_path, monkeypatch):
    """A multi-target --optim_folder's index.json orders its subfolders (the --prompt order);
    relative and absolute paths to the same target image make one row."""
    monkeypatch.chdir(tmp_path)
    for name, colour in (("b", GREEN), ("a", RED)):
        Image.new("RGB", (8, 8), colour).save(tmp_path / f"{name}.png")
    multi = tmp_path / "clip"
    for name in ("b", "a"):
        fake_run(multi / name, "clip_rn50", {"kind": "image", "source": f"{name}.png"})
    (multi / "index.json").write_text(json.dumps({"targets": [{"folder": "b"}, {"folder": "a"}]}))
    fake_run(tmp_path / "vit" / "a", "vit_h14", {"kind": "image", "source": str(tmp_path / "a.png")})
    runs, _ = collect_runs(["clip", "vit"])
    assert [r["folder"].name for r in runs] == ["b", "a", "a"]
    layout = mosaic_layout(runs, 32)
    assert len(layout.rows) == 2 and layout.groups == ["clip_rn50", "vit_h14"]
    assert [run is not None for run in layout.rows[1]] == [True, True]
    assert centre(run_mosaic(runs, 32), layout.box(0, 0), 32) == GREEN


def test_missing_target_image_is_a_grey_cell_not_a_crash(tmp_path):
    fake_run(tmp_path / "r", "toy_all", {"kind": "image", "source": "nowhere/gone.png"})
    runs, _ = collect_runs([tmp_path])
    layout = mosaic_layout(runs, 64)
    image = run_mosaic(runs, 64)
    left, top = layout.box(0, 0)
    assert image.getpixel((left + 2, top + 2)) == GREY


def test_load_run_refuses_unfinished_runs(tmp_path):
    fake_run(tmp_path / "u", "toy_all", finished=False)
    with pytest.raises(RunFolderError, match="unfinished.*--resume"):
        load_run(tmp_path / "u")


def test_cli_mosaic_finds_runs_skips_unfinished_and_writes_png_and_pdf(tmp_path, target_image, capsys):
    study = tmp_path / "study"
    fake_run(study / "shard0" / "green", "toy_shape", target_image)
    fake_run(study / "shard1" / "green", "toy_colour", target_image)
    fake_run(study / "shard1" / "stopped", "toy_colour", finished=False)
    (study / "shard2" / "running").mkdir(parents=True)
    (study / "shard2" / "running" / "log.txt").write_text(LOG_LINES.splitlines()[0] + "\n")
    code, out, err = run_cli([study, "--out", tmp_path / "fig", "--cell", 48], capsys)
    assert code == 0, err
    assert "skipping unfinished run" in err and "stopped" in err and "python x.py --resume" in err
    assert "running: no metrics.json" in err
    assert "1 row x 2 models" in out
    png, pdf = tmp_path / "fig.png", tmp_path / "fig.pdf"
    with Image.open(png) as image:
        runs, _ = collect_runs([study])
        assert image.size == mosaic_layout(runs, 48).size
    assert pdf.read_bytes().startswith(b"%PDF")
    # the explicit command and a single format
    code, _, err = run_cli(["mosaic", study / "shard0", "--out", tmp_path / "one.pdf", "--images", "best"],
                           capsys)
    assert code == 0, err
    assert (tmp_path / "one.pdf").read_bytes().startswith(b"%PDF") and not (tmp_path / "one.png").exists()


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("empty", "no run folder under"),
    ("unfinished", "no finished run"),
    ("bad_json", "cannot read"),
    ("suffix", "unknown format '.jpg'"),
    ("labels", "1 --labels for 2 runs"),
    ("file", "is a file, not a run folder"),
])
def test_cli_mosaic_errors_are_clear(tmp_path, case, message, capsys):
    out = tmp_path / "fig"
    runs = tmp_path / "runs"
    args = [runs, "--out", out]
    if case == "missing":
        args = [tmp_path / "nope", "--out", out]
    elif case == "empty":
        runs.mkdir()
    elif case == "unfinished":
        fake_run(runs / "a", "toy_all", finished=False)
    elif case == "bad_json":
        fake_run(runs / "a", "toy_all")
        (runs / "a" / "metrics.json").write_text("{not json")
    elif case == "suffix":
        fake_run(runs / "a", "toy_all")
        args = [runs, "--out", tmp_path / "fig.jpg"]
    elif case == "labels":
        fake_run(runs / "a", "toy_all")
        fake_run(runs / "b", "toy_all")
        args += ["--labels", "only one"]
    elif case == "file":
        fake_run(runs / "a", "toy_all")
        args = [runs / "a" / "out_img.png", "--out", out]
    code, _, err = run_cli(args, capsys)
    assert code == 2, err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert not list(tmp_path.glob("fig*"))


# --------------------------------------------------------------------------- logs and curves

def test_read_log_gives_back_every_score(tmp_path):
    records = read_log(_write(tmp_path / "log.txt", LOG_LINES))
    assert records == [r for r in RECORDS if isinstance(r, Score)]
    kinds = [kind_of(r) for r in records]
    assert kinds.count("estimate") == 4 and kinds.count("guided") == 4
    assert kinds.count("backward") == 2 and kinds.count("z_prev") == 1 and kinds[-1] == "final"


def test_read_log_without_cosine_and_unfinished_lines(tmp_path):
    old = "".join(OLD_LOG_LINES.splitlines(keepends=True)[:5])
    path = _write(tmp_path / "log.txt", old + "Interrupted by SIGINT before timestep 999, 2th self-recurrence\n")
    records = read_log(path)
    assert len(records) == 4 and all(r.cosine is None for r in records)
    assert [r.distance for r in records] == [10.0, 8.0, 6.0, 5.0]
    path.write_text("Elapsed time = 1 sec\nNumerical fault: NaN in the latent\n")
    with pytest.raises(FigureError, match="no score lines"):
        read_log(path)


def test_plot_log_says_when_the_cosine_is_missing(tmp_path):
    records = read_log(_write(tmp_path / "new.txt", LOG_LINES))
    old = read_log(_write(tmp_path / "old.txt", OLD_LOG_LINES))
    figure = plot_log([("old", old)], [tmp_path / "old.png"])
    assert len(figure.axes) == 1 and "no cosine similarity" in figure.get_suptitle()
    figure = plot_log([("new", records), ("old", old)], [tmp_path / "both.png"], kind="guided")
    assert len(figure.axes) == 2 and "no cosine similarity logged for: old" in figure.get_suptitle()
    distance_axis = figure.axes[0]
    assert distance_axis.get_yscale() == "log"
    left, right = distance_axis.get_xlim()
    assert left > 999 and right < 0                     # noisiest timestep on the left
    with pytest.raises(FigureError, match="kinds present"):
        plot_log([("old", [r for r in old if kind_of(r) != "backward"])], [tmp_path / "x.png"], kind="backward")


def test_cli_curves_writes_valid_png_and_pdf(tmp_path, capsys):
    fake_run(tmp_path / "runs" / "a", "toy_shape")
    stopped = LOG_LINES.split("-1th")[0] + "Interrupted by SIGINT before timestep 0, 1th self-recurrence\n"
    fake_run(tmp_path / "runs" / "b", "toy_colour", finished=False, log=stopped)
    code, out, err = run_cli(["curves", tmp_path / "runs", "--out", tmp_path / "curves"], capsys)
    assert code == 0, err
    assert "curves of 2 runs" in out and "unfinished" in err
    with Image.open(tmp_path / "curves.png") as image:
        image.verify()
        assert image.format == "PNG" and image.width > 300
    assert (tmp_path / "curves.pdf").read_bytes().startswith(b"%PDF")


def test_cli_without_runs_prints_usage(capsys):
    code, _, err = run_cli([], capsys)
    assert code == 2 and "usage:" in err and "error: give run folders" in err


def test_cli_curves_errors(tmp_path, capsys):
    folder = tmp_path / "run"
    fake_run(folder, "toy_all", log="Run options: Namespace()\n")
    code, _, err = run_cli(["curves", folder, "--out", tmp_path / "c.png"], capsys)
    assert code == 2 and err.startswith("error: ") and "no score lines" in err
    code, _, err = run_cli(["curves", folder, "--out", tmp_path / "c.png", "--kind", "sideways"], capsys)
    assert code == 2 and "invalid choice" in err


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# --------------------------------------------------------------------------- real toy runs

def test_real_toy_runs_to_mosaic_and_curves(tmp_path, capsys):
    """Two toy extractors decode the same shipped target (a few iterations each), then both
    figures are made from their folders."""
    from ldm.toy.extractors import TOY_EXTRACTORS
    from ldm.cli import main as guided_main
    from ldm.toy.defaults import TOY_CKPT, TOY_CKPT_HINT, TOY_CONFIG, TOY_DEFAULTS

    target = REPO / "data" / "toy" / "toy_00_red_circle.png"
    for name in ("toy_shape", "toy_colour"):
        code = guided_main({name: name for name in TOY_EXTRACTORS}, defaults=TOY_DEFAULTS, ckpt_hint=TOY_CKPT_HINT, argv=[
            "--extractor", name, "--prompt", str(target), "--optim_forward_guidance",
            "--optim_timesteps", "4", "--optim_num_steps", "2", "1", "--optim_early_emp_end", "900",
            "--config", str(REPO / TOY_CONFIG), "--ckpt", str(REPO / TOY_CKPT),
            "--optim_folder", str(tmp_path / "study" / name), "--no_progress"])
        assert code == 0, capsys.readouterr().err
    capsys.readouterr()
    code, out, err = run_cli([tmp_path / "study", "--out", tmp_path / "mosaic.png", "--cell", 64], capsys)
    assert code == 0, err
    assert "1 row x 2 models" in out
    runs, _ = collect_runs([tmp_path / "study"])
    layout = mosaic_layout(runs, 64)
    with Image.open(tmp_path / "mosaic.png") as image:
        assert image.size == layout.size
        assert centre(image, layout.box(0, 0), 64) == Image.open(target).convert("RGB").getpixel((16, 16))
    code, out, err = run_cli(["curves", tmp_path / "study", "--out", tmp_path / "curves"], capsys)
    assert code == 0, err
    assert (tmp_path / "curves.pdf").read_bytes().startswith(b"%PDF")
    kinds = {kind_of(r) for r in read_log(tmp_path / "study" / "toy_shape" / "log.txt")}
    assert kinds == {"estimate", "guided", "final"}
