"""``normlab recommend``: the user's question as one command, end to end on a small network
and data made here (CLI and Python, interrupted and resumed, learning rates chosen on a
held-out split), and its planning checked on records made by hand: seeds only for the
options still open, a budget that stops before a look it cannot finish, the answer in
words that never call "not shown different" the same."""

from __future__ import annotations

import json
import math
import textwrap
import time

import numpy as np
import pytest

import normlab
from conftest import cli_error
from normlab import runner
from normlab.cli import main
from normlab.experiments import decision
from normlab.experiments import recommend as rec
from test_data_formats import write_npz

NET = '''
    from torch import nn

    def net(in_channels=1, num_classes=3):
        return nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.BatchNorm2d(8),
                             nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(8, num_classes))
'''


@pytest.fixture
def mine(tmp_path):
    (tmp_path / "net.py").write_text(textwrap.dedent(NET))
    write_npz(tmp_path / "img.npz", (1, 6, 6), n_train=96, n_test=48)
    return tmp_path


def command(mine, *extra):
    return ["recommend", "--model", f"{mine / 'net.py'}:net", "--dataset",
            str(mine / "img.npz"), "--variants", "bn", "--references", "gn", "ln",
            "--batch-size", "16", "--epochs", "1", "--max-seeds", "5",
            "--precise-images", "32", "--no-progress", *extra]


def _numbers(record):
    return {k: (r["test_error"], r.get("inference")) for k, r in record["runs"].items()}


def test_recommend_decides_at_its_looks_and_resumes_to_the_same_record(mine, monkeypatch,
                                                                       capsys):
    assert main(command(mine, "--out", str(mine / "whole"))) == 0
    whole = json.loads((mine / "whole" / "recommend.json").read_text())
    assert [d["seeds"] for d in whole["decisions"]] == [3, 5]
    assert set(whole["decisions"][-1]["verdicts"]) == {"bn", "bn precise", "bn batch", "gn",
                                                       "ln"}
    assert whole["done"] is True
    report = (mine / "whole" / "report.md").read_text()
    assert "never a claim that options are the same" in report and "Hsu 1984" in report
    assert (mine / "whole" / "recommend.png").exists()
    said = capsys.readouterr().out
    assert "a run takes" in said and "look at 3 seeds" in said  # what the runs cost

    real = runner.execute

    def stop_at_gn_seed_4(run, *args):  # Ctrl-C as the second look's runs train
        if run.key == "gn/seed4":
            raise KeyboardInterrupt
        return real(run, *args)

    monkeypatch.setattr(runner, "execute", stop_at_gn_seed_4)
    with pytest.raises(SystemExit):
        main(command(mine, "--out", str(mine / "cut")))
    monkeypatch.setattr(runner, "execute", real)
    cut = json.loads((mine / "cut" / "recommend.json").read_text())
    assert len(cut["decisions"]) == 1 and "bn/seed4" in cut["runs"]
    assert main(["recommend", "--resume", str(mine / "cut"), "--no-progress"]) == 0
    resumed = json.loads((mine / "cut" / "recommend.json").read_text())
    assert _numbers(resumed) == _numbers(whole)
    assert resumed["decisions"] == whole["decisions"]


def test_recommend_from_python_and_refusals(mine, capsys):
    record, folder = normlab.run("recommend", model=f"{mine / 'net.py'}:net",
                                 dataset=mine / "img.npz", variants=["bn"], references=["gn"],
                                 batch_size=16, epochs=1, max_seeds=3, precise_images=32,
                                 no_progress=True)
    assert record["decisions"] and (folder / "report.md").exists()
    code, line = cli_error(["recommend", "--resume", str(folder), "--max-seeds", "8"], capsys)
    assert code == 2 and "--max-seeds fixed before its data" in line
    code, line = cli_error(command(mine, "--budget", "soon"), capsys)
    assert code == 2 and "expected a duration such as 3h" in line
    code, line = cli_error(command(mine, "--images-per-statistic", "3"), capsys)
    assert code == 2 and "does not divide --batch-size 16" in line


def test_learning_rates_are_chosen_on_the_held_out_split(mine, monkeypatch):
    """Each option's rate comes from the grid on held-out training images (never the test
    set); a choice at the grid's edge extends it; the chosen rates train the seeds."""
    seen = []
    real = rec.load_data

    def spy(*args, **kwargs):
        seen.append(kwargs.get("holdout"))
        return real(*args, **kwargs)

    monkeypatch.setattr(rec, "load_data", spy)
    out = mine / "tuned"
    assert main(command(mine, "--tune-lr", "0.02", "0.05", "--holdout", "32", "--max-seeds",
                        "3", "--out", str(out))) == 0
    record = json.loads((out / "recommend.json").read_text())
    cfg = record["config"]
    assert set(cfg["rates"]) == {"bn", "gn", "ln"} and seen[0] == 32 and seen[-1] is None
    for v, lr in cfg["rates"].items():
        grid = cfg["tune_grid"][v]
        assert lr in grid and set(grid) >= {0.02, 0.05}
        if lr in (grid[0], grid[-1]):  # still at the edge: only after the extensions
            assert len(grid) == 2 + rec.MAX_GRID_EXTENSIONS
        assert all(r["lr"] == lr for k, r in record["runs"].items()
                   if r["variant"] == v and not k.startswith("tune/"))
    assert "## Learning rates" in (out / "report.md").read_text()


# -- the planning, on records made by hand

def planned(seeds_by_option, plan, looks=(3, 5, 8, 10), wall=60.0):
    """A record whose options have these per-seed errors, as after a pass."""
    runs = {}
    for option, errors in seeds_by_option.items():
        variant, _, mode = option.partition(" ")
        for s, e in enumerate(errors, 1):
            r = runs.setdefault(f"{variant}/seed{s}", dict(variant=variant, seed=s,
                                                           wall_time_s=wall, steps=100))
            if mode:
                r.setdefault("inference", {})[mode] = {"test_error": e}
            else:
                r["test_error"] = e
    return {"config": dict(options=list(seeds_by_option), margin=0.5, alpha=0.05,
                           looks=list(looks), plan=dict(plan), phase="seeds",
                           images_per_statistic=[2]),
            "runs": runs, "decisions": [], "parallel": {"jobs": 1}}


def _study(deadline=math.inf):
    args = type("Args", (), {"deadline": deadline, "out": "out"})()
    study = rec.Recommend.__new__(rec.Recommend)
    study.args = args
    return study


def test_seeds_go_only_to_the_open_options_and_the_best():
    rng = np.random.default_rng(0)
    shared = rng.normal(0, 1, 3)
    errors = {"bn": list(30 + shared + [0.01, -0.01, 0.0]),  # far behind: decided
              "bn precise": list(25 + shared + [0.0, 0.01, -0.01]),  # decided
              "gn": list(10 + shared + rng.normal(0, 0.5, 3)),  # open
              "ln": list(10.2 + shared + rng.normal(0, 0.5, 3))}  # open
    record = planned(errors, {"bn": 3, "gn": 3, "ln": 3})
    study = _study()
    study._after_seeds(record["config"], record)
    verdicts = record["decisions"][0]["verdicts"]
    assert verdicts["bn"] == "worse" and verdicts["bn precise"] == "worse"
    assert record["config"]["plan"] == {"bn": 3, "gn": 5, "ln": 5} and study.more


def test_a_budget_stops_before_a_look_it_cannot_finish():
    errors = {"gn": [10.0, 11.0, 10.5], "ln": [10.4, 10.6, 11.2]}
    record = planned(errors, {"gn": 3, "ln": 3}, wall=600.0)
    study = _study(deadline=time.time() + 60)  # a minute left, the next look needs 40
    study._after_seeds(record["config"], record)
    assert "needs about 40 min" in record["stopped"] and not study.more
    assert record["config"]["plan"] == {"gn": 3, "ln": 3}
    text = decision.answer(record["decisions"][0], errors, record["config"], record["stopped"])
    assert "Not decided (the look at 5 seeds needs about 40 min" in text
    assert "Lowest error so far" in text


def test_the_answer_never_calls_undecided_the_same(monkeypatch):
    last = dict(verdicts={"a": "best", "b": "equivalent", "c": "worse", "d": "undecided"},
                best="a", means={"a": 10.0, "b": 10.1, "c": 12.0, "d": 10.3},
                intervals={"a": [-0.3, 0.2], "b": [-0.2, 0.4], "c": [1.2, 2.8],
                           "d": [-0.5, 1.1]}, seeds_per_option={"a": 10})
    errors = {o: [m + 0.1 * i for i in range(10)] for o, m in last["means"].items()}
    monkeypatch.setattr(decision, "label",
                        lambda o: {"a": "GN+WS", "b": "LN+WS", "c": "BN", "d": "FRN"}[o])
    text = decision.answer(last, errors, {"margin": 0.5, "alpha": 0.05}, None)
    assert "LN+WS is shown within 0.5 points of the best" in text
    assert "BN is shown behind the best by at least 1.20 points" in text
    assert "Not decided: FRN" in text
    for word in ("tied", "same", "no difference"):
        assert word not in text


def test_seeds_needed_follows_the_sample_size_formula():
    """The smallest n that the iterated formula allows, checked against a loop here."""
    errors = {"best": [10.0] * 4, "o": [10.8, 11.2, 10.9, 11.1]}  # gap 1.0
    n = decision.seeds_needed(errors, "o", "best", 0.5, 0.05, 6)
    from scipy import stats as sps
    sd = np.std([0.8, 1.2, 0.9, 1.1], ddof=1)

    def enough(n):
        return n >= ((sps.t.ppf(1 - 0.05 / 30, n - 1) + sps.t.ppf(0.8, n - 1)) * sd) ** 2
    assert enough(n) and (n == 5 or not enough(n - 1))  # more seeds than the 4 it has
    wide = {"best": [10.0] * 4, "o": [10.2, 11.8, 10.3, 11.7]}  # the same gap, more spread
    assert decision.seeds_needed(wide, "o", "best", 0.5, 0.05, 6) > n


@pytest.mark.parametrize("text, seconds", [("3h", 10800), ("90m", 5400), ("2h30m", 9000),
                                           ("45s", 45), ("120", 120)])
def test_budgets_parse(text, seconds):
    assert rec.parse_duration(text) == seconds


def test_seeds_from_an_earlier_study_are_taken_not_trained_again(mine, capsys):
    """A remedies study's seeds 1-3 become the first look; another protocol is refused."""
    earlier = mine / "remedies"
    assert main(["remedies", "--model", f"{mine / 'net.py'}:net", "--dataset",
                 str(mine / "img.npz"), "--variants", "bn", "--references", "gn", "ln",
                 "--images-per-statistic", "2", "16", "--batch-size", "16", "--epochs", "1",
                 "--seeds", "1", "2", "3", "--precise-images", "32", "--out", str(earlier),
                 "--no-progress"]) == 0
    capsys.readouterr()
    out = mine / "extended"
    assert main(command(mine, "--max-seeds", "3", "--seeds-from", str(earlier), "--out",
                        str(out))) == 0
    said = capsys.readouterr().out
    record = json.loads((out / "recommend.json").read_text())
    theirs = json.loads((earlier / "remedies.json").read_text())
    assert "taken from" in said and " seed 1  test error" not in said  # nothing retrained
    assert record["runs"]["bn/seed2"]["test_error"] == theirs["runs"]["bn/ips2/seed2"][
        "test_error"] and record["runs"]["gn/seed3"]["imported_from"]["folder"] == \
        str(earlier.resolve())
    assert record["decisions"][0]["seeds"] == 3
    code, line = cli_error(command(mine, "--epochs", "2", "--seeds-from", str(earlier),
                                   "--out", str(mine / "other")), capsys)
    assert code == 2 and "trained with other epochs (1; here 2)" in line
