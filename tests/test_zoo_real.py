"""bench.zoo_real: the zoo on real Fashion-MNIST, on timm's tiny test_resnet with a budget of a few steps."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import irconvert
from bench import zoo_real


@pytest.mark.slow  # about 20 s: two training stages and an evaluation
def test_a_tiny_model_trains_converts_fine_tunes_and_reports_gap_and_flip_rate(fashion_root):
    rec = zoo_real.real_model("test_resnet", steps=3, overrides=["train.grad_clip=1.0"])
    assert rec["status"] == "ok", rec["reason"]
    assert rec["input_size"] == [3, 32, 32]  # the smallest side tried first
    assert 0 <= rec["fp_top1"] <= 100 and 0 <= rec["binary_top1"] <= 100
    assert rec["gap"] == pytest.approx(rec["fp_top1"] - rec["binary_top1"], abs=0.011)
    assert len(rec["flip_rates"]) == 3 and rec["flip_rate_last"] == rec["flip_rates"][-1]  # a point per step
    assert rec["binary_layers"] > 0 and rec["seconds"] >= rec["binary_seconds"] > 0
    assert 0 < rec["w1a1_mac_share"] <= rec["binary_mac_share"] < 1  # the first and last layers stay real
    table = zoo_real.markdown({"config": {"list": "fast", "tag": None, "steps": 3, "set": [], "note": "",
                                          "policy": {"mode": "W1A1"}}, "rows": [rec]})
    assert f"| test_resnet | timm | 32x32 | {rec['fp_top1']:.1f} | {rec['binary_top1']:.1f} |" in table
    assert ("**1 of 1 within 5 points**" if zoo_real.within([rec]) else "**0 of 1 within 5 points**") in table


@pytest.mark.slow  # about 30 s: the same model twice
def test_the_fp_twin_is_trained_once_and_read_back_for_the_next_run(fashion_root, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    first = zoo_real.real_model("test_resnet", steps=2, fp_cache_on=True)
    assert first["status"] == "ok", first["reason"]
    assert len(list((tmp_path / "irconvert" / "zoo-real-fp").glob("test_resnet-*.pt"))) == 1 and "fp_cached" not in first
    again = zoo_real.real_model("test_resnet", steps=2, overrides=["train.grad_clip=1.0"], fp_cache_on=True)
    assert again["fp_cached"] and again["fp_top1"] == first["fp_top1"]
    fresh = zoo_real.real_model("test_resnet", steps=2, overrides=["train.grad_clip=1.0"])  # no cache: trained anew
    assert "fp_cached" not in fresh and fresh["fp_top1"] == first["fp_top1"]  # and to the same weights
    assert fresh["binary_top1"] == again["binary_top1"]  # the binary stage cannot tell a cached twin from a fresh one
    import torch

    path, = (tmp_path / "irconvert" / "zoo-real-fp").glob("test_resnet-*.pt")
    saved = torch.load(path, weights_only=True)
    assert saved["bn_batches"] == zoo_real.FP_BN_BATCHES  # stored with its BatchNorms re-estimated
    del saved["bn_batches"]  # an entry from before the re-estimate: re-estimated on load, then stored again
    torch.save(saved, path)
    old = zoo_real.real_model("test_resnet", steps=2, fp_cache_on=True)
    assert old["fp_cached"] and old["fp_top1"] == first["fp_top1"] and old["binary_top1"] == first["binary_top1"]
    assert torch.load(path, weights_only=True)["bn_batches"] == zoo_real.FP_BN_BATCHES


def test_the_recipe_is_the_default_policy_and_the_step_budget_over_its_epochs():
    r = zoo_real.train_recipe(["train.epochs=2", "train.w1a32_epochs=1"], 300)
    assert r.train.max_steps_per_epoch == 150 and r.train.w1a32_epochs == 1
    assert r.binarize.model_dump() == type(r.binarize)().model_dump()  # Policy's defaults, not the ResNet recipe's
    assert r.train.distill.alpha == 1.0 and r.train.lr == 0.003  # recipes/fashion-mnist.yaml's train section


@pytest.mark.slow  # a fresh process
def test_a_bad_set_is_one_line_and_exit_2():
    proc = subprocess.run([sys.executable, "-m", "bench.zoo_real", "--set", "train.no_such=1"],
                          capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "train.no_such" in proc.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_the_command_runs_a_model_in_a_worker_and_merges_a_rerun(tmp_path, fashion_root):
    cmd = [sys.executable, "-m", "bench.zoo_real", "--only", "test_resnet", "--list", "timm", "--steps", "2",
           "--jobs", "1", "--out", str(tmp_path)]
    root = Path(__file__).parents[1]
    assert subprocess.run(cmd, capture_output=True, text=True, cwd=root).returncode == 0
    data = json.loads((tmp_path / "zoo-real-timm.json").read_text())
    assert [r["model"] for r in data["rows"]] == ["test_resnet"] and data["rows"][0]["status"] == "ok"
    assert data["config"]["policy"]["mode"] == "W1A1" and data["config"]["steps"] == 2  # the policy is recorded
    assert "| test_resnet | timm |" in (tmp_path / "zoo-real-timm.md").read_text()
    other = subprocess.run(cmd[:-2] + ["--set", "train.grad_clip=1", "--out", str(tmp_path)],
                           capture_output=True, text=True, cwd=root)
    assert other.returncode == 2 and "pass --tag NAME" in other.stderr  # other settings: not over this run


def test_the_options_summary_compares_each_tagged_run_with_its_baseline_on_its_models(tmp_path):
    def row(model, gap, flips, source="timm", w1a1=None):
        return {"model": model, "source": source, "status": "ok", "gap": gap, "flip_rate_mean": flips,
                **({"w1a1_mac_share": w1a1} if w1a1 is not None else {})}

    def config(tag, lr, **more):
        return {"list": "fast", "tag": tag, "set": [], "policy": {"mode": "W1A1"}, "train": {"lr": lr}, **more}

    base = {"config": config(None, 0.003), "rows": [row("a", 10, 0.01), row("b", 2, 0.02), row("c", 1, 0.0),
                                                   row("b", 50, 0.0, "torchvision")]}
    agc = {"config": dict(config("agc", 0.003), set=["train.grad_clip_mode=agc"], train={"lr": 0.003, "grad_clip_mode": "agc"}),
           "rows": [row("a", 4, 0.0), row("b", 3, 0.01)]}
    before = {"config": config("before", 0.001), "rows": [row("a", 20, 0.0)]}
    old = {"config": config("lr", 0.003, baseline="zoo-real-fast-before"), "rows": [row("a", 10, 0.01)]}
    narrow = {"config": dict(config("narrow", 0.003), set=["binarize.w1a1_min_fan_in=64"], policy={"mode": "W1A1", "w1a1_min_fan_in": 64},
                             baseline="zoo-real-fast-rerun"), "rows": [row("a", 1, 0.01, w1a1=0.2), row("b", 2, 0.01, w1a1=0.4)]}
    rerun = {"config": config("rerun", 0.003), "rows": [row("a", 9, 0.02, w1a1=0.5), row("b", 3, 0.02, w1a1=0.7)]}
    for name, data in [("", base), ("-agc", agc), ("-before", before), ("-lr", old), ("-narrow", narrow), ("-rerun", rerun)]:
        (tmp_path / f"zoo-real-fast{name}.json").write_text(json.dumps(data))
    table = zoo_real.summary(tmp_path)
    # against the untagged run on a and b only (not torchvision's b): median gap 6, one of two within 5; the option: 3.5, both
    assert ('| zoo-real-fast-agc | zoo-real-fast | train.grad_clip_mode="agc" | 2 | 3.50 | 6.00 | 2 | 1 | 0.50% | 1.50% | - | - |'
            in table)
    # a run measured against an earlier baseline names it, and what differs from it
    assert "| zoo-real-fast-lr | zoo-real-fast-before | train.lr=0.003 | 1 | 10.00 | 20.00 | 0 | 0 | 1.00% | 0.00% | - | - |" in table
    # a rule that takes layers off the bitwise path shows it: the mean W1A1 share of the MACs, against the baseline's
    assert ("| zoo-real-fast-narrow | zoo-real-fast-rerun | binarize.w1a1_min_fan_in=64 | 2 | 1.50 | 6.00 | 2 | 1 | 1.00% | "
            "2.00% | 30% | 60% |") in table
    assert "\n| zoo-real-fast |" not in table  # the untagged baseline itself is no option


def test_a_vit_is_built_for_32x32_and_a_cnn_as_it_is():
    assert zoo_real.built_for_small_input("vit_tiny_patch16_224", (3, 224, 224)) == {"img_size": 32}
    assert zoo_real.built_for_small_input("resnet18", (3, 32, 32)) == {}  # runs on 32x32 as built
    assert zoo_real.built_for_small_input("torchvision:resnet18", (3, 64, 64)) == {}  # torchvision: no img_size
    table = zoo_real.markdown({"config": {"list": "fast", "tag": None, "steps": 3, "set": [], "note": "",
                                          "policy": {"mode": "W1A1"}},
                               "rows": [dict(zoo_real.blank("vit_tiny_patch16_224", "timm"), status="ok", stage="",
                                             input_size=[3, 32, 32], built_for={"img_size": 32})]})
    assert "| vit_tiny_patch16_224 | timm | 32x32 |" in table and "built with img_size=32 |" in table


def test_a_miss_says_what_its_loss_did_against_the_models_within():
    def row(gap, loss, status="ok"):
        return dict(zoo_real.blank("m", "timm"), status=status, gap=gap, binary_loss=loss, stage="binary-train",
                    reason="" if status == "ok" else "Diverged: loss became nan")

    rows = [row(2.0, [1.0, 0.5, 0.2, 0.15]), row(4.0, [1.0, 0.5, 0.3, 0.11]), row(9.0, [1.0, 0.8, 0.7, 0.5]),
            row(12.0, [1.0, 0.4, 0.4, 0.4, 0.41]), row(7.0, [1.0, 0.3, 0.3, 0.3, 0.6]), row(None, None, "fail")]
    ref = zoo_real.final_losses(rows)
    assert ref == [0.11, 0.15]
    said = [zoo_real.diagnosis(r, ref) for r in rows]
    assert said[:2] == ["", ""]
    assert said[2] == "distillation loss 0.50 at the end (the models within: 0.11-0.15), still falling, 50% lower than 3 log points before"
    assert said[3].endswith("flat over the last 3 log points") and "rising at the end, from 0.30" in said[4]
    assert said[5] == "binary-train: Diverged: loss became nan"


def test_a_row_whose_fp_twin_is_at_chance_is_a_miss_not_a_conversion():
    """An FP twin that learned nothing (10 classes: 10% is chance) makes any binary twin "within" it: such a row
    counts as a miss, stays out of the median, and says why."""
    def row(fp, gap):
        return dict(zoo_real.blank("m", "timm"), status="ok", fp_top1=fp, binary_top1=fp - gap, gap=gap,
                    binary_loss=[1.0, 0.5, 0.2, 0.1])

    rows = [row(80.0, 2.0), row(10.6, 0.5), row(81.0, 7.0), row(20.0, 3.0)]
    assert zoo_real.within(rows) == 2  # 80 -> 78 and 20 -> 17: 20% is twice the prior, the twin learned something
    assert zoo_real.median_gap(rows) == 3.0  # of 2, 3 and 7; the 0.5 at chance is no gap
    assert zoo_real.final_losses(rows) == [0.1, 0.1]
    said = zoo_real.diagnosis(rows[1])
    assert said.startswith("the FP twin did not learn (10.6%") and "counts as a miss" in said


def test_a_new_policy_default_keeps_the_rows_whose_models_it_plans_alike():
    """A policy change reruns only the models it converts differently: keep_projections changes ResNet-18 (its
    1x1 downsamples) and not MobileNetV2 (identity shortcuts only); any other change reruns every model."""
    from irconvert.plan import Policy

    def row(model):
        return dict(zoo_real.blank(model, "timm"), status="ok", gap=1.0)

    before = dict(Policy().model_dump(mode="json"), keep_projections=False)
    old = {"config": {"list": "fast", "tag": None, "steps": 300, "set": [], "policy": before, "train": {"lr": 0.003}},
           "rows": [row("resnet18"), row("mobilenetv2_100")]}
    new = dict(old["config"], policy=dict(before, keep_projections=True))
    kept, rerun = zoo_real.unchanged_rows(old, new)
    assert [r["model"] for r in kept] == ["mobilenetv2_100"] and rerun == ["resnet18"]
    assert zoo_real.unchanged_rows(old, dict(old["config"])) == (old["rows"], [])
    assert zoo_real.unchanged_rows(old, dict(new, train={"lr": 0.01}))[1] == ["resnet18", "mobilenetv2_100"]


def test_an_option_made_a_default_is_adopted_without_running(tmp_path, monkeypatch):
    """--adopt TAG takes a tagged run's rows into the untagged table where its settings are today's defaults; the
    stored rows the new default plans alike stay, and a run under other settings is refused in one line."""
    recipe = zoo_real.train_recipe([], zoo_real.STEPS)
    today = {"list": "fast", "tag": None, "steps": zoo_real.STEPS, "set": [],
             "policy": recipe.binarize.model_dump(mode="json"), "train": recipe.train.model_dump(mode="json")}
    flipped = dict(today["policy"], keep_projections=not today["policy"]["keep_projections"])

    def row(model, gap):
        return dict(zoo_real.blank(model, "timm"), status="ok", fp_top1=80.0, binary_top1=80.0 - gap, gap=gap)

    (tmp_path / "zoo-real-fast.json").write_text(json.dumps(
        {"config": dict(today, policy=flipped, note="the morning's run"), "rows": [row("resnet18", 3.0), row("mobilenetv2_100", 2.0)]}))
    tagged = {"config": dict(today, tag="proj", set=["binarize.keep_projections=..."], note=""), "rows": [row("resnet18", 0.5)]}
    (tmp_path / "zoo-real-fast-proj.json").write_text(json.dumps(tagged))
    monkeypatch.setattr(sys, "argv", ["zoo_real", "--adopt", "proj", "--out", str(tmp_path)])
    zoo_real.main()
    data = json.loads((tmp_path / "zoo-real-fast.json").read_text())
    assert {r["model"]: r["gap"] for r in data["rows"]} == {"resnet18": 0.5, "mobilenetv2_100": 2.0}
    assert data["config"]["policy"] == today["policy"]
    assert [r["model"] for r in data["rows"] if r.get("earlier_policy")] == ["mobilenetv2_100"]
    assert "; 1 rows measured under an earlier policy" in (tmp_path / "zoo-real-fast.md").read_text()
    assert data["config"]["note"].startswith("the morning's run; the rows of resnet18 come from the run tagged proj")

    tagged["config"]["train"] = dict(today["train"], lr=0.01)
    (tmp_path / "zoo-real-fast-proj.json").write_text(json.dumps(tagged))
    with pytest.raises(SystemExit) as exit_:
        zoo_real.main()
    assert exit_.value.code == 2


def test_another_lists_rows_made_under_the_same_settings_are_reused_not_rerun(tmp_path):
    """--reuse fast takes the fast table's row of a model this list also holds, when the fast run's steps,
    policy and train section are this table's; no worker runs, and the list's other models are named as not run."""
    recipe = zoo_real.train_recipe([], 2)
    config = {"list": "fast", "tag": None, "steps": 2, "set": [], "note": "",
              "policy": recipe.binarize.model_dump(mode="json"), "train": recipe.train.model_dump(mode="json")}
    row = dict(zoo_real.blank("test_resnet", "timm"), status="ok", stage="", fp_top1=80.0, binary_top1=78.0, gap=2.0,
               input_size=[3, 32, 32], seconds=1.0, lists=["fast"])
    (tmp_path / "zoo-real-fast.json").write_text(json.dumps({"config": config, "rows": [row]}))
    cmd = [sys.executable, "-m", "bench.zoo_real", "--list", "timm", "--only", "test_resnet", "--steps", "2",
           "--reuse", "fast", "--out", str(tmp_path)]
    root = Path(__file__).parents[1]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=root)
    assert proc.returncode == 0, proc.stderr
    data = json.loads((tmp_path / "zoo-real-timm.json").read_text())
    assert [(r["model"], r["gap"], r["reused_from"], r["lists"]) for r in data["rows"]] == [
        ("test_resnet", 2.0, "zoo-real-fast.json", ["timm"])]
    assert len(data["unrun"]) > 50 and "vit_tiny_patch16_224" in data["unrun"] and "test_resnet" not in data["unrun"]
    md = (tmp_path / "zoo-real-timm.md").read_text()
    assert "measured in zoo-real-fast.json" in md and f"Not run yet: {len(data['unrun'])} of the list's" in md
    (tmp_path / "zoo-real-timm.json").unlink()
    config["train"]["lr"] = 0.5  # the fast run under other settings: refused, nothing written
    (tmp_path / "zoo-real-fast.json").write_text(json.dumps({"config": config, "rows": [row]}))
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=root)
    assert proc.returncode == 2 and "--reuse fast" in proc.stderr and "its train" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "zoo-real-timm.json").exists()


def test_a_policy_field_added_with_a_neutral_default_does_not_make_stored_rows_stale(tmp_path):
    policy = irconvert.Policy().model_dump(mode="json")
    before = {k: v for k, v in policy.items() if k not in ("w1a1_min_fan_in", "keep_projections")}
    config = {"list": "fast", "tag": None, "steps": 300, "set": [], "train": {}, "policy": policy}
    stored = dict(config, policy=before)
    row = dict(zoo_real.blank("vit_tiny_patch16_224", "timm"), status="ok", gap=1.0)
    (tmp_path / "zoo-real-fast.json").write_text(json.dumps({"config": stored, "rows": [row]}))
    run = zoo_real.read_run(tmp_path / "zoo-real-fast.json")
    assert run["config"]["policy"]["w1a1_min_fan_in"] == 0  # filled: the runs before it computed with 0
    assert "keep_projections" not in run["config"]["policy"]  # not neutral: a run without it ran without it
    assert zoo_real.unchanged_rows(dict(run, config=dict(run["config"], policy=dict(policy, keep_projections=None))),
                                   dict(config, policy=dict(policy, keep_projections=None))) == ([run["rows"][0]], [])


def test_only_a_torchvision_name_selects_that_model_alone_not_also_timm_s_namesake():
    from bench import zoo

    specs = [s for s, _ in zoo.select("torchvision", "resnet18,efficientnet_b0", None)[0]]
    assert sorted(specs) == ["torchvision:efficientnet_b0", "torchvision:resnet18"]
    outside = [s for s, _ in zoo.select("torchvision", "resnet18,test_resnet", None)[0]]
    assert "test_resnet" in outside and "resnet18" not in outside  # a name no list holds still runs


def test_each_row_says_which_run_measured_it_and_what_the_machine_was_doing():
    """A table filled by several partial runs keeps each run's conditions with its rows: a later run's note does
    not replace what an earlier one said (that the slow tests shared its cores)."""
    def row(model, run=None, **kw):
        return dict(zoo_real.blank(model, "timm"), status="ok", fp_top1=80.0, binary_top1=79.0, gap=1.0,
                    input_size=[3, 32, 32], seconds=1.0, **({"run": run} if run else {}), **kw)

    busy = {"date": "2026-12-03", "cores": 2, "jobs": 2, "note": "the slow tests beside it, so busy"}
    idle = {"date": "2026-12-04", "cores": 2, "jobs": 2, "note": "nothing else ran"}
    rows = [row("a_net", busy), row("b_net", idle), row("c_net", busy), row("d_net"),
            row("e_net", busy, reused_from="zoo-real-fast.json"), row("f_net", earlier_policy=True)]
    config = {"list": "timm", "tag": None, "steps": 2, "set": [], "note": "last run 10 s wall",
              "policy": irconvert.Policy().model_dump(mode="json"), "train": {}}
    md = zoo_real.markdown({"config": config, "rows": rows})
    assert "- run a (2 rows, 2026-12-03, 2 worker(s) on 2 cores): the slow tests beside it, so busy" in md
    assert "- run b (1 rows, 2026-12-04, 2 worker(s) on 2 cores): nothing else ran" in md
    assert "- 2 rows from runs made before rows recorded their run's conditions" in md
    assert "; 1 rows measured under an earlier policy" in md
    cells = {line.split(" | ")[0][2:]: line.split(" | ")[-1] for line in md.splitlines() if line.startswith("| ")}
    assert cells["a_net"] == "run a |" and cells["b_net"] == "run b |" and cells["c_net"] == "run a |"
    assert cells["d_net"] == " |" and cells["e_net"] == "measured in zoo-real-fast.json |"
