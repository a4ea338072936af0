"""The GPU machine's own Python gets the packages it lacks as wheels prepared here
(ldm/benchmarks/device_wheels.py) at this project's pins; its runner passes flags that
gpu_check.py takes."""
import re
import shlex

from tiny_models import REPO

from ldm.benchmarks import device_wheels

def test_wheels_are_the_pins_of_constraints_txt():
    from importlib.metadata import version
    wanted = device_wheels.requirements()
    assert wanted == [f"{name}=={version(name)}" for name in ("omegaconf", "open_clip_torch", "ftfy", "wcwidth")]


def test_runner_flags_are_gpu_check_flags():
    from ldm.benchmarks import gpu_check
    runner = (REPO / "scripts" / "gpu_check_system_python.sh").read_text()
    flags = re.search(r"scripts/gpu_check.py (.*) \"\$@\"", runner).group(1)
    args = gpu_check.parse_args(["--device", "cpu", *shlex.split(flags.replace("${OUT:-outputs}", "outputs"))])
    assert args.out == "outputs/gpu_check" and args.budget_s <= 360   # inside 8 minutes in all
