"""The remedies study (``normlab remedies``): its runs against the compare runs that compute
the same thing, its inference remedies against ``normlab evaluate`` on its saved weights,
its report's paired differences against a recomputation from the record, and bad input."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from scipy import stats as sps

from conftest import cli_error
from normlab import evaluate
from normlab.cli import main
from normlab.data import load_data
from normlab.experiments.remedies import errors_by_size, reference_errors, render_report
from normlab.stats import paired_difference

GRID = ["--variants", "bn", "brn", "--references", "gn", "--images-per-statistic", "2", "16",
        "--batch-size", "16", "--epochs", "1", "--seeds", "1", "2", "--precise-images", "64",
        "--device", "cpu", "--no-progress"]


def test_remedies_study_end_to_end(tiny_mnist, tmp_path, capsys):
    _, folder = tiny_mnist
    out = tmp_path / "remedies"
    assert main(["remedies", *GRID, "--data-dir", str(folder), "--out", str(out)]) == 0
    record = json.loads((out / "remedies.json").read_text())
    runs = record["runs"]
    assert list(runs) == [f"{k}/seed{s}" for s in (1, 2)
                          for k in ("bn/ips2", "bn/ips16", "brn/ips2", "brn/ips16", "gn")]
    assert [runs[k]["images_per_statistic"] for k in list(runs)[:5]] == [2, 16, 2, 16, None]
    assert set(runs["bn/ips2/seed1"]["inference"]) == {"precise", "precise-grouped", "batch",
                                                       "precise-augmented"}
    assert "inference" not in runs["gn/seed1"]

    # Oracle 1: each run is the compare run with the same statistics, bit for bit.
    ref = tmp_path / "compare"
    assert main(["compare", "--variants", "brn", "--batch-size", "16", "--epochs", "1",
                 "--virtual-batch-size", "2", "--device", "cpu", "--no-progress",
                 "--data-dir", str(folder), "--out", str(ref)]) == 0
    compare = json.loads((ref / "metrics.json").read_text())["variants"]["brn"]["runs"][0]
    assert runs["brn/ips2/seed1"]["test_acc"] == compare["history"]["test_acc"][-1]

    # Oracle 2: the inference remedies are normlab evaluate's on the saved weights.
    model, how = evaluate.load_trained(out / "bn_ips2_seed1.safetensors", torch.device("cpu"))
    assert (how.images_per_statistic, how.batch_size) == (2, 16)
    data = load_data(folder)
    for mode, result in runs["bn/ips2/seed1"]["inference"].items():
        _, acc = evaluate.evaluate_model(model, data, how, mode, torch.device("cpu"), 64)
        assert result["test_acc"] == acc, mode
    assert not (out / "bn_ips2_seed2.safetensors").exists()  # the first seed's only

    # The report: the table from the record, the paired differences recomputed here.
    report = (out / "report.md").read_text()
    assert report == render_report(record)
    lines = errors_by_size(record)
    d = paired_difference(lines["brn"][2], lines["bn"][2])
    assert f"| Batch Renorm (brn) | {d.mean:+.2f} ({d.low:+.2f} to {d.high:+.2f})" in \
        report.replace("**", "")
    precise = [runs[f"bn/ips16/seed{s}"]["inference"]["precise"]["test_error"] for s in (1, 2)]
    assert f"{sum(precise) / 2:.2f} ({min(precise):.2f}–{max(precise):.2f})" in report
    assert "| Wu & He 2018 (Group Norm), Table 2 and text |" in report
    assert "| trainable parameters | 9,530 | 9,530 | 9,530 |" in report
    assert (out / "remedies.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "precise" in printed and "report: " in printed
    assert "normlab remedies: bn brn over 2 16 images per statistic and gn x 2 seed(s)" in printed


@pytest.mark.parametrize("args, message", [
    (["--images-per-statistic", "3"], "--images-per-statistic 3 does not divide --batch-size "
                                      "128"),
    (["--precise-images", "64"], "--precise-images 64 is below one batch of 128 images"),
    (["--virtual-batch-size", "4"], "use --images-per-statistic instead of "
                                    "--virtual-batch-size"),
    (["--variants", "gn"], "argument --variants: invalid choice: 'gn' (choose from 'bn+l1', "
                           "'bn', 'brn', 'bn+ws', 'evob0')"),
    (["--references", "bn"], "argument --references: invalid choice: 'bn'"),
])
def test_remedies_refuses_impossible_settings_in_one_line(args, message, capsys, tmp_path):
    code, line = cli_error(["remedies", *args, "--out", str(tmp_path / "x")], capsys)
    assert code == 2 and message in line, line


# -- extending a record (normlab report --add) and the report's corrected comparisons

COMMITTED = Path(__file__).parents[1] / "results" / "remedies" / "fashion-mnist"


def _split(seeds: set[int], **config: Any) -> dict[str, Any]:
    """The committed Fashion-MNIST record cut down to ``seeds``, as if run on its own."""
    record = json.loads((COMMITTED / "remedies.json").read_text())
    lr = record["config"]["lr"]
    record["runs"] = {k: r for k, r in record["runs"].items()
                      if r["seed"] in seeds and r["lr"] == lr}
    record["config"] = {**record["config"], "seeds": sorted(seeds), **config}
    record.pop("extensions", None)
    record.pop("config_as_run", None)
    return record


def _folder(path: Path, record: dict[str, Any]) -> Path:
    path.mkdir()
    (path / "remedies.json").write_text(json.dumps(record))
    return path


def test_report_add_extends_a_record_and_keeps_each_part_s_provenance(tmp_path, capsys):
    main_folder = _folder(tmp_path / "a", _split({1, 2}))
    later = _split({3})
    later["command"] = "normlab remedies --seeds 3 --out elsewhere"
    later["environment"] = {**later["environment"], "cpu": "Some Other CPU",
                            "git_revision": "abc123456789"}
    assert main(["report", str(main_folder), "--add", str(_folder(tmp_path / "b", later))]) == 0
    merged = json.loads((main_folder / "remedies.json").read_text())
    whole = _split({1, 2, 3})
    assert merged["runs"].keys() == whole["runs"].keys()
    assert merged["config"]["seeds"] == [1, 2, 3]
    assert [e["command"] for e in merged["extensions"]] == [later["command"]]
    report = (main_folder / "report.md").read_text()
    assert report == render_report(merged)
    assert "Extended by 21 run(s) of another command (started" in report
    # The main command's own configuration stays on its provenance line.
    assert "seeds=[1, 2], epochs=5" in report and merged["config_as_run"]["seeds"] == [1, 2]
    assert "Some Other CPU" in report and "`abc123456789`" in report
    # The tables are those of the record made in one piece.
    assert [line for line in report.splitlines() if line.startswith("| Batch Renorm (brn) |")] \
        == [line for line in render_report(whole).splitlines()
            if line.startswith("| Batch Renorm (brn) |")]


@pytest.mark.parametrize("change, message", [
    (dict(epochs=6), "different protocols (epochs: 5 vs 6)"),
    (dict(seeds_overlap=True), "run(s) are in both records"),
])
def test_report_add_refuses_and_leaves_the_record_as_it_was(tmp_path, capsys, change, message):
    folder = _folder(tmp_path / "a", _split({1, 2}))
    before = (folder / "remedies.json").read_bytes()
    other = _split({2, 3}) if change.pop("seeds_overlap", False) else _split({3}, **change)
    code, line = cli_error(["report", str(folder), "--add", str(_folder(tmp_path / "b", other))],
                           capsys)
    assert code == 2 and message in line, line
    assert (folder / "remedies.json").read_bytes() == before
    assert not (folder / "report.md").exists()


def test_a_learning_rate_check_sits_beside_the_grid_and_not_in_it(tmp_path, capsys):
    folder = _folder(tmp_path / "a", _split({1, 2, 3}))
    check = _split({1, 2, 3}, lr=0.1)
    for r in check["runs"].values():
        r["lr"], r["test_error"] = 0.1, r["test_error"] - 1.0  # every option 1 point better
    check["runs"]["ln/seed2"] = {k: v for k, v in check["runs"]["ln/seed2"].items()
                                 if k in ("variant", "batch_size", "seed", "lr", "steps",
                                          "images_per_statistic")}
    check["runs"]["ln/seed2"].update(failed="ln: loss became non-finite", wall_time_s=0.0)
    assert main(["report", str(folder), "--add", str(_folder(tmp_path / "b", check))]) == 0
    merged = json.loads((folder / "remedies.json").read_text())
    assert "bn/ips2/seed1/lr0.1" in merged["runs"] and merged["config"]["lr"] == 0.05
    report = (folder / "report.md").read_text()
    alone = render_report(_split({1, 2, 3}))
    table = [line for line in alone.splitlines() if line.startswith("| Batch Norm (bn) |")]
    assert [line for line in report.splitlines() if line.startswith("| Batch Norm (bn) |")] \
        == table
    gn = [r["test_error"] for r in check["runs"].values() if r["variant"] == "gn"]
    assert f"| Group Norm (gn), any grouping | {sum(gn) / 3 + 1:.2f} | **{sum(gn) / 3:.2f}** " \
           f"| 0.1 |" in report
    ln = [r["test_error"] for k, r in merged["runs"].items() if k.startswith("ln/")
          and r["lr"] == 0.05 and r["seed"] in (1, 2, 3)]
    assert f"| Layer Norm (ln), any grouping | **{sum(ln) / 3:.2f}** | – (1 failed) | 0.05 |" \
        in report
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "sweep.json").write_text(json.dumps({**_split({1}), "config": {"lr": 0.02}}))
    other = tmp_path / "sweep2"
    other.mkdir()
    (other / "sweep.json").write_text(json.dumps({**_split({2}), "config": {"lr": 0.05}}))
    code, line = cli_error(["report", str(sweep), "--add", str(other)], capsys)
    assert code == 2 and "different learning rates (0.02 vs 0.05)" in line, line


def test_ranking_is_holm_over_each_option_against_the_first():
    """The ranking at 2 images per statistic (ten seeds in the committed record), recomputed
    with scipy's paired t-test and Holm's step-down rule written out here."""
    record = json.loads((COMMITTED / "remedies.json").read_text())
    report = render_report(record)
    lines = errors_by_size(record)
    options = {line: by[2] for line, by in lines.items() if 2 in by}
    options.update(reference_errors(record))
    means = {o: sum(e.values()) / len(e) for o, e in options.items()}
    ranked = sorted(options, key=means.get)
    first = options[ranked[0]]
    p = [sps.ttest_rel([options[o][s] for s in sorted(options[o].keys() & first.keys())],
                       [first[s] for s in sorted(options[o].keys() & first.keys())]).pvalue
         for o in ranked[1:]]
    order = sorted(range(len(p)), key=p.__getitem__)
    adjusted, running = [0.0] * len(p), 0.0
    for k, i in enumerate(order):
        running = max(running, min(1.0, (len(p) - k) * p[i]))
        adjusted[i] = running
    section = report.split("## Ranking at 2 images per statistic")[1].split("\n## ")[0]
    rows = [r for r in section.splitlines() if r.startswith("| ") and r[2].isdigit()]
    assert len(rows) == len(ranked)
    for row, o, q in zip(rows[1:], ranked[1:], adjusted, strict=True):
        shown = "< 0.001" if q < 0.001 else f"{q:.3f}"
        assert f"p {shown}" in row, (row, o, q)
        assert row.count("**") == (2 if q < 0.05 else 0), row


def test_a_report_shows_no_folder_of_the_machine_that_made_it():
    from normlab.report import shown_command

    assert shown_command("normlab remedies --jobs 2 --out /work/study-out/mnist --no-progress") \
        == "normlab remedies --jobs 2 --out OUTDIR --no-progress"
    assert shown_command("normlab sweep --out runs/sweep") == "normlab sweep --out runs/sweep"
    # a long command breaks before its options, each with its values, to fit 80 columns
    long = ("normlab remedies --dataset fashion-mnist --model examples/resnet.py:resnet "
            "--model-arg depth=8 --variants bn brn evob0 --references gn gn+ws ln+ws frn "
            "evos0 --images-per-statistic 2 128 --jobs 2 --no-progress --out '/w/my runs'")
    shown = shown_command(long)
    lines = shown.split(" \\\n")
    assert len(lines) > 1 and all(len(line) <= 78 for line in lines)
    assert all(line.startswith("    --") for line in lines[1:])
    assert shlex.split(shown.replace("\\\n", "")) == \
        shlex.split(long.replace("'/w/my runs'", "OUTDIR"))
    report = (COMMITTED / "report.md").read_text()
    assert "/work/" not in report and "--out OUTDIR" in report
    # a --model file is recorded absolute; the report shows it from the rendering folder
    from normlab.report import local

    assert local(f"{Path.cwd() / 'examples' / 'resnet.py'}:resnet") == "examples/resnet.py:resnet"
    assert local("/elsewhere/net.py:net") == "/elsewhere/net.py:net"


def test_report_add_refuses_a_folder_it_cannot_extend_in_one_line(tmp_path, capsys):
    folder = _folder(tmp_path / "a", _split({1, 2}))
    before = (folder / "remedies.json").read_bytes()
    code, line = cli_error(["report", str(folder), "--add", str(tmp_path / "nowhere")], capsys)
    assert code == 2 and line.endswith("nowhere/remedies.json does not exist; give an output "
                                       "folder of the same study"), line
    assert (folder / "remedies.json").read_bytes() == before
    compare = tmp_path / "compare"
    compare.mkdir()
    (compare / "metrics.json").write_text(json.dumps({"config": {}, "variants": {}}))
    code, line = cli_error(["report", str(compare), "--add", str(folder)], capsys)
    assert code == 2 and "--add extends grid studies (sweep, statistics, remedies); " \
        "metrics.json is not one" in line, line


def _holm(p: list[float]) -> list[float]:
    """Holm's step-down adjustment, written here as the oracle."""
    order = sorted(range(len(p)), key=p.__getitem__)
    adjusted, running = [0.0] * len(p), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p) - rank) * p[i]))
        adjusted[i] = running
    return adjusted


def test_transfer_lines_check_one_networks_verdicts_on_another():
    """Each comparison tested on each network over its own seeds, each network's rows one
    Holm family (scipy's paired t-test and a Holm loop here as the oracle); the verdict
    column follows from the two."""
    from normlab.experiments.ranking import _TRANSFER, transfer_lines

    def lines(bn2, bn128, seeds):
        return {"bn": {2: {s: bn2 + 0.1 * s * s % 0.7 for s in seeds},
                       128: {s: bn128 + 0.05 * (s % 3) for s in seeds}}}

    def refs(gn, frn, seeds):
        return {"gn": {s: gn + 0.07 * (s % 4) for s in seeds},
                "frn": {s: frn + 0.11 * (s % 2) for s in seeds}}

    cnn = (lines(17.0, 10.0, range(1, 11)), refs(11.0, 12.0, range(1, 11)))
    resnet = (lines(12.0, 10.0, (1, 2, 3)), refs(10.2, 9.0, (1, 2, 3)))
    text = transfer_lines(resnet, cnn, ("ResNet-8", "the CNN"), str)
    rows = [line for line in text if line.startswith("| ") and "comparison" not in line
            and "---" not in line]
    made = [c for c in _TRANSFER if c[0] in ("bn", "gn", "frn") and c[2] == "bn"]
    assert len(rows) == len(made) == 5  # bn@2-bn@128, gn and frn against bn at 2 and 128
    for network, column in ((cnn, 1), (resnet, 2)):
        p = []
        for a, sa, b, sb in made:
            x, y = (network[1][a] if not sa else network[0][a][sa]), network[0][b][sb]
            seeds = sorted(x.keys() & y.keys())
            p.append(sps.ttest_rel([x[s] for s in seeds], [y[s] for s in seeds]).pvalue)
        for row, adjusted in zip(rows, _holm(p), strict=True):
            cell = row.split(" | ")[column]
            assert (cell.startswith("**") == (adjusted < 0.05)), (row, adjusted)
            assert f"p {adjusted:.3f}" in cell or adjusted < 0.001
    verdicts = {row.split(" | ")[0][2:]: row.split(" | ")[3].rstrip(" |") for row in rows}
    assert verdicts["bn at 2 − bn at 128"] == "shown on both"
    assert verdicts["frn − bn at 128"] == "**opposite**"  # +2 on the CNN, -1 on the ResNet


def test_report_beside_another_remedies_study(tmp_path, tiny_mnist, capsys):
    out, other = tmp_path / "a", tmp_path / "b"
    for folder in (out, other):
        assert main(["remedies", "--variants", "bn", "--references", "gn",
                     "--images-per-statistic", "2", "32", "--batch-size", "32", "--seeds",
                     "1", "2", "--epochs", "1", "--limit-train", "64", "--data-dir",
                     str(tiny_mnist[1]), "--precise-images", "64", "--out", str(folder),
                     "--no-progress"]) == 0
    assert main(["report", str(out), "--beside", str(other)]) == 0
    record = json.loads((out / "remedies.json").read_text())
    assert record["beside"] == {"folder": "../b"}
    report = (out / "report.md").read_text()
    assert ("## Beside normlab's small CNN: which differences are shown on normlab's small "
            "CNN too") in report
    assert "| Group Norm (gn) − Batch Norm (bn) at 2 |" in report
    code, line = cli_error(["report", str(out), "--beside", str(tmp_path)], capsys)
    assert code == 2 and "remedies.json does not exist" in line


def test_the_committed_record_is_decided_as_recommend_decides():
    """The decision at 128 images per statistic in the committed Fashion-MNIST report is
    stats.decide's over the ten seeds every option has, with seeds 4-10 a second look;
    every verdict's interval is recomputed here with scipy (Bonferroni's paired t)."""
    record = json.loads((COMMITTED / "remedies.json").read_text())
    report = render_report(record)
    section = report.split("## Decided at 128 images per statistic")[1].split("\n## ")[0]
    lines = errors_by_size(record)
    options = {o: by[128] for o, by in lines.items() if 128 in by and (
        " " not in o or o in ("bn precise", "bn batch"))}
    options.update(reference_errors(record))
    k, seeds = len(options), range(1, 11)
    level = 0.05 - 0.05 * (3 / 10) ** 2  # the second look's share of alpha
    c = sps.t.ppf(1 - level / (k * (k - 1)), 9)
    for o, errors in options.items():
        bounds = []
        for other, theirs in options.items():
            if other != o:
                d = np.array([errors[s] - theirs[s] for s in seeds])
                half = c * d.std(ddof=1) / np.sqrt(10)
                bounds.append((d.mean() - half, d.mean() + half))
        low, high = max(b[0] for b in bounds), max(b[1] for b in bounds)
        row = next(r for r in section.splitlines() if f"(`{o}`)" in r)
        assert f"{low:+.2f} to {high:+.2f}" in row, (o, row)
        verdict = "equivalent" if high <= 0.5 else "worse" if low > 0 else None
        if verdict and "| best |" not in row:
            assert f"| {verdict} |" in row, (o, row)
    assert "never a claim that options are the same" in section
