"""Results as data: seed aggregation, comparisons, `wsss collect`, `wsss report` and the README's generated table."""
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from stages.cli import app
from stages.report import stale_stages
from wsss_core.errors import DataError
from wsss_core.results import (BLOCK_BEGIN, BLOCK_END, Spread, compare, comparisons, extract_block, group_runs,
                               headline, readme_block, render_markdown)

REPO = Path(__file__).resolve().parents[1]


def record(seed, seg, method="cam", variant="", control=None, data="synthetic", cam=0.5):
    return {"name": f"{data}-{method}-{variant}-{seed}", "method": method, "data": data, "profile": "cpu",
            "seed": seed, "variant": variant, "control": control, "command": f"dvc exp run -S seed={seed}",
            "commit": "abc1234", "headline": {"cam": cam, "seg": seg, "rw": None},
            "per_class": {"seg": {"background": 0.9, "gold": seg}}, "seconds": {"train_cls": 100.0 + seed}}


def test_spread_mean_sample_std_and_n():
    spread = Spread.of([0.5, 0.6, 0.7, None])
    assert (spread.mean, spread.n) == (pytest.approx(0.6), 3) and spread.std == pytest.approx(0.1)
    assert spread.text() == "60.0 ± 10.0 (n=3)"
    assert Spread.of([0.543]).text() == "54.3 (one run)"
    assert Spread.of([None]).text() == "not measured" and Spread.of([]).n == 0


def test_headline_takes_each_stage_and_never_invents_a_value():
    metrics = {"cam": {"miou": 0.5, "auc": 0.8, "sweep": {"best_miou": 0.6},
                       "baselines": {"all_background": 0.12, "all_foreground": 0.06}},
               "rw": {"miou": None, "skipped": "pseudo.source is cam"}, "train_cls": {"val_map": 0.9}}
    values = headline(metrics)
    assert (values["cam"], values["cam_best"], values["cam_auc"], values["cls_map_val"]) == (0.5, 0.6, 0.8, 0.9)
    assert (values["train_all_bg"], values["train_all_fg"]) == (0.12, 0.06)
    assert values["rw"] is None and values["seg"] is None and values["refined"] is None


def test_runs_differing_only_in_seed_form_one_row_and_a_duplicate_seed_is_refused():
    rows = group_runs([record(1, 0.6), record(0, 0.5), record(0, 0.7, variant="rws")])
    assert [(row.variant, row.seeds) for row in rows] == [("", [0, 1]), ("rws", [0])]
    assert rows[0].spread("seg").mean == pytest.approx(0.55)
    with pytest.raises(DataError, match="seed 0"):
        group_runs([record(0, 0.5), record(0, 0.6)])


def test_compare_says_when_a_difference_is_inside_the_spread():
    plain = group_runs([record(s, v) for s, v in enumerate((0.50, 0.54, 0.58))])[0]
    close = group_runs([record(s, v, variant="a") for s, v in enumerate((0.52, 0.55, 0.58))])[0]
    far = group_runs([record(s, v, variant="b") for s, v in enumerate((0.70, 0.71, 0.72))])[0]
    assert compare(close, plain, "seg") == "+1.0 points, largest std 4.0: inside the spread: no difference"
    assert compare(far, plain, "seg") == "+17.0 points, largest std 4.0: outside the spread"
    one = group_runs([record(0, 0.9, variant="c")])[0]
    assert "fewer than 2 seeds" in compare(one, plain, "seg")
    assert compare(one, plain, "rw") == "not measured on both sides"


def write_records(folder, records):
    folder.mkdir(parents=True, exist_ok=True)
    for item in records:
        (folder / f"{item['name']}.json").write_text(json.dumps(item))


def test_report_writes_markdown_html_and_readme_block_and_check_detects_drift(tmp_path):
    runs = tmp_path / "runs"
    write_records(runs, [record(s, v) for s, v in enumerate((0.50, 0.54, 0.58))]
                  + [record(s, v, variant="rws", control="") for s, v in enumerate((0.60, 0.61, 0.62))])
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\n{BLOCK_BEGIN}\nold table\n{BLOCK_END}\n\nmore\n")
    paths = ["--runs", str(runs), "--out", str(tmp_path / "results.md"), "--html", str(tmp_path / "results.html"),
             "--readme", str(readme)]
    result = CliRunner().invoke(app, ["report", *paths])
    assert result.exit_code == 0, result.output
    markdown = (tmp_path / "results.md").read_text()
    assert "| cam | synthetic | not measured | 50.0 (one run)" not in markdown
    assert "| cam | synthetic | not measured | 50.0 ± 0.0 (n=3) | not measured | not measured | not measured" \
           " | not measured | not measured | 54.0 ± 4.0 (n=3) | not measured |" in markdown
    assert "cam · rws against cam on synthetic (seeds 0, 1, 2, n=3): seg (val) +7.0 points, largest std 4.0: " \
           "outside the spread" in markdown
    block = extract_block(readme.read_text())
    assert block == readme_block(group_runs([json.loads(p.read_text()) for p in runs.glob("*.json")]))
    assert block.split("\n")[1:-1] == markdown.split("## Every stage\n\n")[1].split("\n\n")[0].split("\n")
    assert readme.read_text().startswith("# title\n") and readme.read_text().endswith("\nmore\n")
    page = (tmp_path / "results.html").read_text()
    assert "<svg" in page and "<script" not in page and "http" not in page.replace('http://www.w3.org', '')
    assert CliRunner().invoke(app, ["report", "--check", *paths]).exit_code == 0
    write_records(runs, [record(3, 0.9)])
    stale = CliRunner().invoke(app, ["report", "--check", *paths])
    assert stale.exit_code == 1 and "out of date" in stale.output


def test_report_names_a_corrupted_record_and_writes_nothing(tmp_path):
    runs = tmp_path / "runs"
    write_records(runs, [record(0, 0.5)])
    (runs / "broken.json").write_text('{"name": "broken", "method": ')
    readme = tmp_path / "README.md"
    readme.write_text(f"{BLOCK_BEGIN}\n{BLOCK_END}\n")
    paths = ["--runs", str(runs), "--out", str(tmp_path / "r.md"), "--html", str(tmp_path / "r.html"),
             "--readme", str(readme)]
    result = CliRunner().invoke(app, ["report", *paths])
    assert result.exit_code == 2 and "broken.json: not a readable run record" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "r.md").exists()
    (runs / "partial.json").write_text(json.dumps({"name": "partial", "method": "cam"}))
    skipped = CliRunner().invoke(app, ["report", "--skip-bad", *paths])
    assert skipped.exit_code == 0 and "partial.json: run record without data" in skipped.output
    assert "50.0 (one run)" in (tmp_path / "r.md").read_text()
    empty = CliRunner().invoke(app, ["report", "--runs", str(tmp_path / "none"), *paths[2:]])
    assert empty.exit_code == 2 and "no run records" in empty.output


def test_collect_stores_the_workspace_run(tmp_path, monkeypatch):
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics/cam.json").write_text(json.dumps({"miou": 0.5, "per_class": {"background": 0.8}}))
    (tmp_path / "metrics/rw.json").write_text(json.dumps({"miou": None, "skipped": "not needed"}))
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs/stage_times.jsonl").write_text(
        '{"stage": "train_cls", "seconds": 9.5, "finished": 100}\n{"stage": "eval_cams", "seconds": 2.0, '
        '"finished": 300}\n{"stage": "eval_cams", "seconds": 3.0, "finished": 400}\n{"stage": "cut')
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["collect", "--command", "dvc exp run", "--since", "200", "--variant", "x"])
    assert result.exit_code == 0, result.output
    stored = json.loads((tmp_path / "results/runs/synthetic-cam-x-seed0.json").read_text())
    assert stored["headline"]["cam"] == 0.5 and stored["headline"]["rw"] is None
    assert stored["seconds"] == {"eval_cams": 3.0} and stored["per_class"] == {"cam": {"background": 0.8}}
    assert stored["cores"] == len(os.sched_getaffinity(0)) and stored["threads"] == torch.get_num_threads()
    assert (stored["method"], stored["data"], stored["seed"], stored["command"]) == ("cam", "synthetic", 0,
                                                                                      "dvc exp run")
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["data"].update(name="voc", voc={**params["data"]["voc"], "root": "elsewhere/voc12-mini"})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert CliRunner().invoke(app, ["collect", "--command", "x"]).exit_code == 0
    assert json.loads((tmp_path / "results/runs/voc12-mini-cam-seed0.json").read_text())["data"] == "voc12-mini"
    (tmp_path / "metrics/cam.json").unlink()
    nothing = CliRunner().invoke(app, ["collect", "--command", "x"])
    assert nothing.exit_code == 2 and "no score file" in nothing.output


def test_stale_stages_are_the_out_of_date_ones_and_everything_downstream_of_them():
    pipeline = {"stages": {"a": {"outs": ["x"]}, "b": {"deps": ["x/file.h5", "code.py"],
                                                       "metrics": [{"m.json": {"cache": False}}]},
                           "c": {"deps": ["m.json"]}, "d": {"deps": ["xy", "code.py"]}}}
    assert stale_stages({"a"}, pipeline) == {"a", "b", "c"}
    assert stale_stages({"c", "unknown"}, pipeline) == {"c"} and stale_stages(set(), pipeline) == set()
    real = yaml.safe_load((REPO / "dvc.yaml").read_text())
    assert stale_stages({"refine"}, real) >= {"refine", "random_walk", "pseudo_masks", "train_seg", "evaluate"}
    assert not stale_stages({"refine"}, real) & {"prepare", "train_cls", "export_cams", "eval_cams"}


def test_collect_leaves_out_the_score_files_of_stale_stages(tmp_path, monkeypatch):
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    (tmp_path / "metrics").mkdir()
    for stem, miou in (("cam", 0.5), ("rw", 0.6), ("seg", 0.7)):
        (tmp_path / f"metrics/{stem}.json").write_text(json.dumps({"miou": miou}))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("stages.report.workspace_stale_stages", lambda: {"random_walk", "evaluate"})
    result = CliRunner().invoke(app, ["collect", "--command", "dvc exp run eval_cams"])
    assert result.exit_code == 0 and "left out metrics/rw.json: stage random_walk" in result.output
    stored = json.loads((tmp_path / "results/runs/synthetic-cam-seed0.json").read_text())["headline"]
    assert (stored["cam"], stored["rw"], stored["seg"]) == (0.5, None, None)


def test_readme_and_docs_results_match_the_stored_runs():
    """docs/results.md, docs/results.html and the README's results table are what `wsss report` makes of
    results/runs/ (run `wsss report` after `wsss collect`)."""
    result = CliRunner().invoke(app, ["report", "--check", "--runs", str(REPO / "results/runs"), "--out",
                                      str(REPO / "docs/results.md"), "--html", str(REPO / "docs/results.html"),
                                      "--readme", str(REPO / "README.md")])
    assert result.exit_code == 0, result.output
    markdown = (REPO / "docs/results.md").read_text()
    assert extract_block((REPO / "README.md").read_text()).split("\n")[1:-1] == \
        markdown.split("## Every stage\n\n")[1].split("\n\n")[0].split("\n")
    assert render_markdown(group_runs([json.loads(p.read_text()) for p in (REPO / "results/runs").glob("*.json")])) \
        == markdown


def test_the_attention_statistics_reach_the_headline_and_a_table_of_their_own_rows():
    values = headline({"cam_refined": {"miou": 0.3, "attention": {
        "object_query_on_objects": 0.4, "background_query_on_objects": 0.1, "object_token_share": 0.13,
        "class_map_correlation": 0.25, "images": 10, "multi_class_images": 3}}})
    assert (values["attention_object"], values["attention_background"], values["attention_grid"],
            values["class_map_corr"]) == (0.4, 0.1, 0.13, 0.25)
    mct = record(0, 0.5, method="mct")
    mct["headline"].update(attention_object=0.4, attention_background=0.1, attention_grid=0.13, class_map_corr=0.25)
    text = render_markdown(group_runs([record(0, 0.5), mct]))
    section = text.split("## The refinement's assumption")[1].split("## ")[0]
    assert "| mct | synthetic | not measured | not measured | not measured | not measured | 0.400 (one run) | " \
           "0.100 (one run) | 0.130 (one run) | 0.250 (one run) |" in section
    assert "| cam |" not in section
    assert "- none recorded" in render_markdown(group_runs([record(0, 0.5)])).split("## The refinement's")[1]


def test_per_class_tables_average_each_class_over_seeds_per_data_set():
    rows = group_runs([record(0, 0.5), record(1, 0.7), record(0, 0.2, method="mct"),
                       record(0, 0.4, data="voc12-mini")])
    text = render_markdown(rows).split("## Per-class IoU of the segmenter")[1].split("## ")[0]
    assert "| cam | 2 | 90.0 | 60.0 |" in text and "| mct | 1 | 90.0 | 20.0 |" in text  # gold: (50 + 70) / 2
    synthetic, voc = text.split("voc12-mini:")
    assert "| background | gold |" in synthetic and "| cam | 1 | 90.0 | 40.0 |" in voc


def test_a_comparison_takes_only_the_seeds_both_rows_ran():
    """Seeds 0-2 of the plain row against seeds 1-2 of the variant: seed 0 (seg 0.10, far from the rest) must not
    enter; the variant's seeds 1, 2 (0.62, 0.64) against the plain row's (0.60, 0.62) differ by +2.0."""
    rows = group_runs([record(0, 0.10), record(1, 0.60), record(2, 0.62),
                       record(1, 0.62, variant="rws", control=""), record(2, 0.64, variant="rws", control=""),
                       record(5, 0.5, variant="lone", control="")])
    text = "\n".join(comparisons(rows))
    assert "cam · rws against cam on synthetic (seeds 1, 2, n=2): seg (val) +2.0 points, largest std 1.4: " \
           "outside the spread" in text
    assert "cam · lone against cam on synthetic: no seed run on both sides" in text
