"""benchmarks.distill_gain reuses a finished run only if it trained with the settings its configuration resolves
to today, so a changed default cannot leave an old run under a method's name."""
import pytest
import yaml

import train_distill
from benchmarks.distill_gain import _AnyTarget, changed_settings, check_reuse
from distill.settings import resolve


def write_run(folder, argv, epochs=2, **recorded):
    """A finished run's folder as train_distill.py leaves it: opt.yaml with the resolved settings (some replaced
    by `recorded`, as an older release wrote them), best.pt and one results.csv row per epoch."""
    opt = train_distill.parse_opt(True, argv)
    args = vars(opt)
    if opt.teacher:
        args.update(resolve(opt, _AnyTarget(), nb=10, epochs=opt.epochs).args())
    (folder / "weights").mkdir(parents=True)
    (folder / "weights" / "best.pt").write_bytes(b"")
    (folder / "results.csv").write_text("epoch\n" + "".join(f"{e}\n" for e in range(epochs)))
    (folder / "opt.yaml").write_text(yaml.safe_dump({**args, **recorded}))


def test_a_finished_run_is_reused_only_with_the_settings_it_trained_with(tmp_path):
    teacher = tmp_path / "t.pt"
    teacher.write_bytes(b"teacher")  # resolve only hashes the file
    base = ["--epochs", "2", "--seed", "1"]
    sl2 = [*base, "--teacher", str(teacher), "--distill-method", "sl2"]
    write_run(tmp_path / "sl2_s1", sl2)
    write_run(tmp_path / "baseline_s1", base)
    assert changed_settings(tmp_path / "sl2_s1", sl2) == {}
    assert changed_settings(tmp_path / "baseline_s1", base) == {}
    # the same flags, trained when sl2's default weight was 6.0: today they resolve to 0.25
    write_run(tmp_path / "old_s1", sl2, distill_weight=6.0)
    assert changed_settings(tmp_path / "old_s1", sl2) == {"distill_weight": (6.0, 0.25)}
    # a baseline folder under a distilled configuration, and another seed
    assert changed_settings(tmp_path / "baseline_s1", sl2)["distill_method"] == (None, "sl2")
    assert changed_settings(tmp_path / "sl2_s1", [*sl2, "--seed", "2"]) == {"seed": (1, 2)}
    runs = [("sl2", 1, "sl2_s1", sl2), ("sl2", 1, "old_s1", sl2)]
    with pytest.raises(SystemExit, match=r"old_s1: distill_weight 6\.0 -> 0\.25") as e:
        check_reuse(runs, [], tmp_path)
    assert "sl2_s1:" not in str(e.value)
    check_reuse(runs[:1], [], tmp_path)  # nothing stale: no error
    # an unfinished run (fewer rows than epochs) is trained again, not compared
    (tmp_path / "old_s1" / "results.csv").write_text("epoch\n0\n")
    check_reuse(runs, [], tmp_path)
