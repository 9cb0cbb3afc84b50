"""Every number `normlab explain` shows or writes, checked against torch's own normalizations.

The reference is torch: ``F.batch_norm`` (training mode), ``F.layer_norm``, ``F.group_norm``
and ``F.instance_norm`` for the outputs, and torch's statistics (BN's running buffers with
momentum 1, ``native_layer_norm`` / ``native_group_norm``'s mean and 1/std) for the means and
variances -- never the code under test.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import re
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import formulas
import openpyxl
import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from normlab.cli import add_explain_parser as add_parser
from normlab.cli import cmd_explain as run
from normlab.explain import (
    EPS,
    TECHNIQUES,
    build_example,
    draw_figure,
    explain,
    format_text,
    stat_counts,
    to_json,
    to_markdown,
    write_xlsx,
)

DOCS = Path(__file__).resolve().parents[1] / "docs"
TOL = {"rtol": 0.0, "atol": 1e-6}


def torch_reference(x: torch.Tensor, key: str, groups: int = 2, eps: float = EPS
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(means, population variances, output) of ``x`` (N, C, H, W), computed by torch."""
    n, c, h, w = x.shape
    if key == "BN":
        # With momentum 1 the running buffers become this batch's mean and *unbiased* variance.
        mean, var = torch.zeros(c, dtype=x.dtype), torch.ones(c, dtype=x.dtype)
        out = F.batch_norm(x, mean, var, training=True, momentum=1.0, eps=eps)
        count = n * h * w
        return mean, var * (count - 1) / count, out
    if key == "LN":
        _, mean, rstd = torch.native_layer_norm(x, [c, h, w], None, None, eps)
        out = F.layer_norm(x, (c, h, w), eps=eps)
        return mean.flatten(), rstd.flatten() ** -2 - eps, out
    g = groups if key == "GN" else c
    _, mean, rstd = torch.native_group_norm(x, None, None, n, c, h * w, g, eps)
    out = F.group_norm(x, g, eps=eps) if key == "GN" else F.instance_norm(x, eps=eps)
    return mean, rstd**-2 - eps, out


def assert_matches_torch(x: torch.Tensor, key: str, groups: int = 2) -> None:
    result = explain(x, key, groups)
    mean, var, out = torch_reference(x, key, groups)
    torch.testing.assert_close(result.means, mean, **TOL)
    torch.testing.assert_close(result.variances, var, **TOL)
    torch.testing.assert_close(result.normalised, out, **TOL)


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="normlab")
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["explain", *argv])
    assert args.func is run
    return args.func(args)


# --- the example and the numbers ------------------------------------------------------------


def test_example_is_seeded_integer_float64() -> None:
    x = build_example()
    assert x.shape == (2, 3, 4, 2, 2) and x.dtype == torch.float64
    assert torch.equal(x, x.round()) and x.min() >= 0 and x.max() <= 9
    assert torch.equal(x, build_example(0))
    assert not torch.equal(x, build_example(1))


@pytest.mark.parametrize("key", list(TECHNIQUES))
def test_example_matches_torch(key: str) -> None:
    for layer in build_example():
        assert_matches_torch(layer, key)


@st.composite
def layers_and_groups(draw: st.DrawFn) -> tuple[torch.Tensor, int]:
    groups = draw(st.integers(1, 3))
    n, c = draw(st.integers(1, 4)), groups * draw(st.integers(1, 3))
    h, w = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    assume(h * w > 1)  # torch's batch_norm and instance_norm refuse sets of one value
    size = n * c * h * w
    values = draw(st.lists(st.floats(-100, 100), min_size=size, max_size=size))
    return torch.tensor(values, dtype=torch.float64).reshape(n, c, h, w), groups


@settings(max_examples=50, deadline=None)
@given(layers_and_groups())
def test_random_shapes_match_torch(case: tuple[torch.Tensor, int]) -> None:
    x, groups = case
    for key in TECHNIQUES:
        assert_matches_torch(x, key, groups)


@pytest.mark.parametrize("key", list(TECHNIQUES))
def test_sets_partition_the_layer_and_carry_their_own_statistics(key: str) -> None:
    x = build_example()[1]
    result = explain(x, key)
    seen = []
    for s in result.sets:
        seen += s.members
        assert s.values == [x[m].item() for m in s.members]
        assert s.normalised == [result.normalised[m].item() for m in s.members]
        mean = sum(s.values) / len(s.values)
        assert math.isclose(s.mean, mean, abs_tol=1e-12)
        assert math.isclose(s.variance, sum((v - mean) ** 2 for v in s.values) / len(s.values),
                            abs_tol=1e-12)
    every_index = torch.cartesian_prod(*map(torch.arange, x.shape)).tolist()  # sorted
    assert sorted(seen) == [tuple(index) for index in every_index]  # each value exactly once


def test_hand_computed_bn_mean_of_channel_0_layer_1() -> None:
    """Pins the default example too: if it changes, docs/normalization.md is stale."""
    values = [4, 9, 3, 0, 6, 8, 4, 3, 3, 0, 5, 5]  # x[layer 1][n=0..2, c=0], read off the table
    mean = Fraction(sum(values), 12)  # 50/12
    variance = sum((v - mean) ** 2 for v in values) / 12
    bn = explain(build_example()[0], "BN").sets[0]
    assert bn.label == "c=0" and bn.values == values
    assert math.isclose(bn.mean, float(mean), abs_tol=1e-12)
    assert math.isclose(bn.variance, float(variance), abs_tol=1e-12)
    assert f"mean = {float(mean):.6f}, variance = {float(variance):.6f}" in format_text(
        build_example())


# --- counts ---------------------------------------------------------------------------------


def test_counts_for_the_example() -> None:
    counts = stat_counts(3, 4, groups=2, layers=2)
    expected = {"BN": (4, "C"), "LN": (3, "N"), "GN": (6, "N * G"), "IN": (12, "N * C")}
    for key, (per_layer, formula) in expected.items():
        assert counts[key] == {"formula": formula, "means_per_layer": per_layer,
                               "variances_per_layer": per_layer, "means_total": 2 * per_layer,
                               "variances_total": 2 * per_layer}
        result = explain(build_example()[0], key)
        assert len(result.sets) == result.means.numel() == result.variances.numel() == per_layer


@given(st.integers(1, 64), st.integers(1, 8), st.integers(1, 8), st.integers(1, 5))
def test_counts_follow_the_shapes(n: int, g: int, per_group: int, layers: int) -> None:
    c = g * per_group
    counts = stat_counts(n, c, groups=g, layers=layers)
    for key, per_layer in {"BN": c, "LN": n, "GN": n * g, "IN": n * c}.items():
        assert counts[key]["means_per_layer"] == counts[key]["variances_per_layer"] == per_layer
        assert counts[key]["means_total"] == counts[key]["variances_total"] == per_layer * layers


def test_bad_arguments_are_refused() -> None:
    x = build_example()[0]
    with pytest.raises(ValueError, match="groups=3"):
        explain(x, "GN", groups=3)
    with pytest.raises(ValueError, match="unknown technique"):
        explain(x, "XN")
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        explain(build_example(), "BN")
    with pytest.raises(ValueError, match="groups=0"):
        stat_counts(3, 4, groups=0)


# --- what the command prints ----------------------------------------------------------------

LAYER = re.compile(r"^Layer (\d+), (\w+) ")
SET = re.compile(r"^  set (.+?): x\[.*\]: mean = (\S+), variance = (\S+)$")
MAP = re.compile(r"^    x\[n=(\d+), c=(\d+)\] = (.*)  ->  y = (.*)$")


def test_printed_numbers_match_torch(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("--seed", "3") == 0
    out = capsys.readouterr().out
    x = build_example(3)
    printed: dict[tuple[int, str], int] = {}
    for line in out.splitlines():
        if m := LAYER.match(line):
            layer, key = int(m[1]) - 1, m[2]
            mean, var, y = torch_reference(x[layer], key)
            printed[(layer, key)] = 0
        elif m := SET.match(line):
            index = tuple(int(part.split("=")[1]) for part in m[1].split(", "))
            assert abs(float(m[2]) - mean[index].item()) <= 1e-6
            assert abs(float(m[3]) - var[index].item()) <= 1e-6
        elif m := MAP.match(line):
            n, c = int(m[1]), int(m[2])
            assert [float(v) for v in m[3].split()] == x[layer][n, c].flatten().tolist()
            torch.testing.assert_close(torch.tensor([float(v) for v in m[4].split()],
                                                    dtype=torch.float64),
                                       y[n, c].flatten(), **TOL)
            printed[(layer, key)] += 4
    # every output of every technique and layer was printed once
    assert printed == {(layer, key): 48 for layer in range(2) for key in TECHNIQUES}
    assert "eps = 1e-05" in out and "gamma = 1, beta = 0" in out
    for key, per_layer in {"BN": 4, "LN": 3, "GN": 6, "IN": 12}.items():
        row = rf"^  {key}\s+[A-Z* ]+\s+{per_layer} \+ {per_layer}\s+{2 * per_layer} \+ "
        assert re.search(row + rf"{2 * per_layer}$", out, re.MULTILINE), key


# --- JSON -----------------------------------------------------------------------------------


def test_json_round_trip(capsys: pytest.CaptureFixture[str]) -> None:
    x = build_example(5)
    doc = json.loads(to_json(x, seed=5))
    assert doc["example"]["inputs"] == x.tolist() and doc["example"]["eps"] == EPS
    assert doc["counts"] == json.loads(json.dumps(stat_counts(3, 4, 2, 2)))
    for layer, techniques in enumerate(doc["layers"]):
        for key, entry in techniques.items():
            mean, var, out = torch_reference(x[layer], key)
            for name, expected in (("means", mean), ("variances", var), ("normalised", out)):
                torch.testing.assert_close(torch.tensor(entry[name], dtype=torch.float64),
                                           expected, **TOL)
            for s in entry["sets"]:
                index = tuple(s["index"])
                assert math.isclose(s["mean"], mean[index].item(), abs_tol=1e-6)
                assert math.isclose(s["variance"], var[index].item(), abs_tol=1e-6)
                assert s["values"] == [x[layer][tuple(m)].item() for m in s["members"]]
    assert cli("--seed", "5", "--json", "-") == 0  # stdout carries the JSON alone
    assert json.loads(capsys.readouterr().out) == doc


# --- the workbook ---------------------------------------------------------------------------


def evaluate(path: Path) -> dict[str, float]:
    """Compute every cell of the workbook with the `formulas` engine: {"SHEET!A1": value}."""
    solution = formulas.ExcelModel().loads(str(path)).finish().calculate()
    values = {}
    for key, ranges in solution.items():
        book_sheet, cell = key.rsplit("!", 1)
        if ":" not in cell:
            values[f"{book_sheet.split(']')[1].strip(chr(39))}!{cell}".upper()] = (
                ranges.value[0, 0])
    return values


def check_workbook(path: Path, cells: dict, x: torch.Tensor, eps: float) -> int:
    values = evaluate(path)
    reference = {}
    for layer, key in itertools.product(range(len(x)), TECHNIQUES):
        mean, var, out = torch_reference(x[layer], key, eps=eps)
        reference[(key, layer)] = {"mean": mean, "variance": var, "std": (var + eps).sqrt(),
                                   "normalised": out}
    checked = 0
    for (sheet, layer, quantity, index), address in cells.items():
        if sheet == "inputs":
            continue
        expected = reference[(sheet, layer)][quantity][index].item()
        assert abs(float(values[address.upper()]) - expected) <= 1e-6, (address, quantity)
        checked += 1
    return checked


@pytest.fixture(scope="module")
def workbook(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    path = tmp_path_factory.mktemp("xlsx") / "normalization.xlsx"
    return path, write_xlsx(build_example(), path, seed=0)


def test_workbook_formulas_match_torch(workbook: tuple[Path, dict]) -> None:
    path, cells = workbook
    wb = openpyxl.load_workbook(path)
    assert wb.sheetnames == ["README", "Inputs", "BN", "LN", "GN", "IN"]
    formula_cells = {f"{key}!{cell.coordinate}" for key in TECHNIQUES
                     for row in wb[key].iter_rows() for cell in row
                     if isinstance(cell.value, str) and cell.value.startswith("=")}
    # every formula is accounted for: 3 per set (mean, variance, std) and one per output
    assert formula_cells == {a for k, a in cells.items() if k[0] != "inputs"}
    sets = sum(count["means_total"] for count in stat_counts(3, 4, 2, 2).values())
    assert len(formula_cells) == 3 * sets + 4 * 2 * 48
    assert all(wb[a.split("!")[0]][a.split("!")[1]].value.startswith("=AVERAGE(Inputs!")
               for k, a in cells.items() if k[2] == "mean")
    assert check_workbook(path, cells, build_example(), EPS) == len(formula_cells)


def test_workbook_formulas_are_live(workbook: tuple[Path, dict], tmp_path: Path) -> None:
    path, cells = workbook
    x = build_example()
    x[0, 0, 0, 0, 0] = 100.0  # layer 1, n=0, c=0, h=0, w=0
    wb = openpyxl.load_workbook(path)
    for key, value in ((("inputs", 0, "x", (0, 0, 0, 0)), 100.0), (("inputs", 0, "eps", ()), 0.5)):
        sheet, cell = cells[key].split("!")
        wb[sheet][cell] = value
    edited = tmp_path / "edited.xlsx"
    wb.save(edited)
    assert check_workbook(edited, cells, x, eps=0.5) > 0
    assert explain(x[0], "BN", eps=0.5).means[0] != explain(build_example()[0], "BN").means[0]


# --- the figure -----------------------------------------------------------------------------


def test_figure(tmp_path: Path) -> None:
    path = tmp_path / "sets.png"
    fig = draw_figure(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size < 200_000
    assert len(fig.axes) == 4
    for ax, t in zip(fig.axes, TECHNIQUES.values(), strict=True):
        assert t.name in ax.get_title() and ax.get_xlabel() and ax.get_ylabel()


def test_docs_quote_the_real_output() -> None:
    text = (DOCS / "normalization.md").read_text(encoding="utf-8")
    assert to_markdown(build_example(0), seed=0) in text
    assert "](figures/normalization_sets.png)" in text
    assert (DOCS / "figures" / "normalization_sets.png").is_file()


# --- the command line -----------------------------------------------------------------------


def test_cli_writes_every_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    paths = {flag: tmp_path / f"out{suffix}" for flag, suffix in
             (("json", ".json"), ("markdown", ".md"), ("xlsx", ".xlsx"), ("figure", ".png"))}
    argv = [arg for flag, path in paths.items() for arg in (f"--{flag}", str(path))]
    assert cli(*argv) == 0
    assert all(path.stat().st_size > 0 for path in paths.values())
    assert json.loads(paths["json"].read_text()) == json.loads(to_json(build_example(), seed=0))
    assert "Layer 2, IN" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--xlsx", "{tmp}"], "is a directory"),
    (["--json", "{tmp}/afile/out.json"], "is not a directory"),
    (["--figure", "{tmp}/missing/fig.png"], "does not exist"),
    (["--figure", "{tmp}/fig.jpgx"], "should end in .png or .svg or .pdf"),
    (["--xlsx", "-"], "cannot write to stdout"),
    (["--json", "-", "--markdown", "-"], "only one of"),
    (["--groups", "3"], "groups=3 must be a positive divisor of C=4"),
])
def test_cli_errors_are_one_line(argv: list[str], message: str, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "afile").write_text("")
    assert cli(*(arg.format(tmp=tmp_path) for arg in argv)) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and captured.err.startswith("normlab explain: error: ")
    assert message in captured.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]  # nothing half-written


def test_cli_reports_a_failed_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    def refuse(*args: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("normlab.explain.write_xlsx", refuse)
    assert cli("--xlsx", str(tmp_path / "out.xlsx")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot write (Permission denied)" in err


def test_module_runs_as_a_script(tmp_path: Path) -> None:
    ok = subprocess.run([sys.executable, "-m", "normlab.explain", "--json", "-"],
                        capture_output=True, text=True, check=False)
    assert ok.returncode == 0 and json.loads(ok.stdout)["example"]["seed"] == 0
    bad = subprocess.run([sys.executable, "-m", "normlab.explain", "--xlsx", str(tmp_path)],
                         capture_output=True, text=True, check=False)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.startswith("normlab explain: error: ") and bad.stderr.count("\n") == 1
