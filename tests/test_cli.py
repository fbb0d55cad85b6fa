"""The four command lines report user errors as one `ERROR:` line on stderr and a non-zero exit; bugs keep
their traceback."""
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import NAMES
from tests.test_data import closed_port_url
from utils.logging import UserError, cli_main

pytestmark = pytest.mark.slow  # end-to-end runs: skipped by pytest -m "not slow"

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "shapes_yolov5n.pt"


class _Payload:
    def __reduce__(self):
        return os.system, ("echo pwned",)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A checkpoint the loader refuses, a data yaml whose images are missing, one whose download is offline."""
    d = tmp_path_factory.mktemp("cli")
    torch.save({"epoch": 1, "x": _Payload()}, d / "evil.pt")
    (d / "missing.yaml").write_text(yaml.safe_dump({"path": str(d / "nowhere"), "train": "images/train",
                                                    "val": "images/val", "names": NAMES}))
    (d / "offline.yaml").write_text(yaml.safe_dump({"path": str(d / "offline"), "train": "images/train",
                                                    "val": "images/val", "names": NAMES,
                                                    "download": closed_port_url("offline.zip")}))
    return d


CASES = {  # script, arguments, expected in the message
    "train refused checkpoint": ("train_distill.py", "--weights {d}/evil.pt", "refused global"),
    "train missing data": ("train_distill.py", "--data {d}/missing.yaml", "data set not found"),
    "val refused checkpoint": ("val.py", "--weights {d}/evil.pt --data {data}", "refused global"),
    "val offline download": ("val.py", "--weights {fixture} --data {d}/offline.yaml", "offline.zip failed"),
    "detect refused checkpoint": ("detect.py", "--weights {d}/evil.pt --source {data.parent}/images/val",
                                  "refused global"),
    "detect missing webcam": ("detect.py", "--weights {fixture} --source 99", "Failed to open webcam 99"),
    "export refused checkpoint": ("export.py", "--weights {d}/evil.pt", "refused global"),
    "export missing weights": ("export.py", "--weights {d}/none.pt", "none.pt"),
}
AS_SUBPROCESS = [c for c in CASES if "refused" in c]  # one per script: the `python x.py` entry point itself


def _argv(case, files, data, tmp_path):
    script, args, expected = CASES[case]
    argv = args.format(d=files, fixture=FIXTURE, data=data).split()
    if script != "export.py":
        argv += ["--project", str(tmp_path / "runs"), "--device", "cpu"]
    return script, argv, expected


def _assert_one_error_line(stderr, expected):
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ERROR: ") and expected in lines[0], stderr[-2000:]


@pytest.mark.parametrize("case", AS_SUBPROCESS)
def test_user_error_is_one_line_on_stderr(files, tiny_data, case, tmp_path):
    script, argv, expected = _argv(case, files, tiny_data, tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("YOLOV5KD_TRACEBACK", None)
    r = subprocess.run([sys.executable, script, *argv], cwd=ROOT, capture_output=True, text=True, env=env)
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    _assert_one_error_line(r.stderr, expected)
    assert "pwned" not in r.stdout


@pytest.mark.parametrize("case", [c for c in CASES if c not in AS_SUBPROCESS])
def test_user_error_is_one_line_in_process(files, tiny_data, case, tmp_path, capfd, monkeypatch):
    """The other cases through the same cli_main, in this process; capfd also sees what native code
    (OpenCV opening a camera) writes to the stderr file descriptor."""
    monkeypatch.delenv("YOLOV5KD_TRACEBACK", raising=False)
    script, argv, expected = _argv(case, files, tiny_data, tmp_path)
    module = importlib.import_module(Path(script).stem)
    with pytest.raises(SystemExit) as e:
        cli_main(module.main, lambda: module.parse_opt(argv=argv))
    assert e.value.code == 1
    _assert_one_error_line(capfd.readouterr().err, expected)


def test_cli_main_reports_user_errors_and_lets_bugs_through(capsys, monkeypatch):
    monkeypatch.delenv("YOLOV5KD_TRACEBACK", raising=False)

    def fail(exc):
        def main(opt):
            raise exc
        return main

    for exc in (UserError("no usable images\nin x"), ValueError("bad yaml"), FileNotFoundError("gone.pt"),
                ConnectionError("offline"), ImportError("no onnx")):
        with pytest.raises(SystemExit) as e:
            cli_main(fail(exc), lambda: None)
        assert e.value.code == 1
        err = capsys.readouterr().err
        assert err == f"ERROR: {' '.join(str(exc).split())}\n"
    for bug in (TypeError("x"), KeyError("k"), RuntimeError("shape mismatch"), ZeroDivisionError()):
        with pytest.raises(type(bug)):
            cli_main(fail(bug), lambda: None)
    monkeypatch.setenv("YOLOV5KD_TRACEBACK", "1")
    with pytest.raises(ValueError):
        cli_main(fail(ValueError("bad yaml")), lambda: None)
    assert cli_main(lambda opt: opt + 1, lambda: 1) == 2
