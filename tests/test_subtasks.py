"""dataset.subtasks: ARC's source-exam split checked against the jsonl ids, k-means groups, the stages that use
them (lora's train split, the generator's prompts, stage=data) and the dnd recipe's steps with sub-tasks."""

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from hydra import initialize_config_dir
from omegaconf import OmegaConf

from loragen.data import load_split
from loragen.data import subtasks as st
from loragen.errors import ConfigError
from loragen.pipeline import dnd, engine
from tests.conftest import (
    CONF,
    DATA_DIR,
    compose,
    run_cli,
    run_stage_in_process,
)

ARC_E_MIN50 = {"Mercury": 1419, "NYSEDREGENTS": 210, "MCAS": 187, "TIMSS": 59, "other": 376}  # of 2251


def exam_counts(name: str, min_size: int) -> dict[str, int]:
    """Independently of the code: the id before its first `_`, trailing digits dropped (CSZ10336 -> CSZ,
    NCEOGA2013 -> NCEOGA); exams under min_size counted as `other`."""
    ids = [json.loads(line)["id"] for line in open(Path(DATA_DIR) / name / "train.jsonl") if line.strip()]
    exams = Counter(i.split("_")[0].rstrip("0123456789") for i in ids)
    out = Counter({e: n for e, n in exams.items() if n >= min_size})
    other = sum(n for n in exams.values() if n < min_size)
    return {**out, **({"other": other} if other else {})}


def train_records(cfg):
    return cfg.dataset, load_split(cfg.dataset, str(cfg.dataset.train_split), data_dir=DATA_DIR).records


@pytest.mark.parametrize("name,min_size", [("arc_easy", 50), ("arc_challenge", 50), ("arc_challenge", 30)])
def test_field_split_of_arc_is_the_source_exam(name, min_size, paths):
    cfg = compose([f"dataset={name}", "dataset.subtasks.by=field", f"dataset.subtasks.min_size={min_size}"])
    spec, records = train_records(cfg)
    parts = st.groups(spec, records, paths)
    assert {g: len(i) for g, i in parts.items()} == exam_counts(name, min_size)
    assert sorted(i for idx in parts.values() for i in idx) == list(range(len(records)))  # a partition
    for g, idx in parts.items():
        if g != "other":
            assert all(records[i].id.startswith(g) for i in idx)
    if (name, min_size) == ("arc_easy", 50):
        assert {g: len(i) for g, i in parts.items()} == ARC_E_MIN50 and list(parts)[-1] == "other"


def test_group_names_are_safe_and_small_groups_merge():
    labels = ["AKDE&ED"] * 3 + ["b"] * 2 + ["c"]
    assert st.merge_small(labels, 2, "d") == {"AKDE-ED": [0, 1, 2], "b": [3, 4], "other": [5]}
    assert st.split_task("arc_easy@AKDE-ED") == ("arc_easy", "AKDE-ED") and st.split_task("piqa") == ("piqa", None)
    assert st.task_name("piqa", None) == "piqa" and st.task_name("piqa", "c1") == "piqa@c1"


def test_kmeans_finds_blobs_and_names_them_by_size():
    gen = torch.Generator().manual_seed(0)
    centers = torch.eye(8)[:3] * 10
    sizes = [10, 30, 20]
    x = torch.cat([c + 0.1 * torch.randn(n, 8, generator=gen) for c, n in zip(centers, sizes)])
    names = st.cluster_names(st.kmeans(x, 3, seed=0))
    assert names == ["c2"] * 10 + ["c0"] * 30 + ["c1"] * 20  # c0: the largest blob
    assert torch.equal(st.kmeans(x, 3, seed=5), st.kmeans(x, 3, seed=5))
    with pytest.raises(ConfigError, match="subtasks.k=4 clusters but only 3 records"):
        st.kmeans(x[:3], 4, seed=0)


def test_kmeans_on_minilm_embeddings_is_deterministic(paths, tmp_path):
    cfg = compose(["dataset=piqa", "dataset.subtasks.by=kmeans", "dataset.subtasks.k=3", "dataset.subtasks.min_size=1"])
    spec, records = train_records(cfg)
    records = records[:60]
    fresh = [OmegaConf.create(OmegaConf.to_container(paths)) for _ in range(2)]
    runs = []
    for i, p in enumerate(fresh):
        p.cache_dir = str(tmp_path / f"cache{i}")  # each run embeds from scratch
        runs.append(st.groups(spec, records, p))
    assert runs[0] == runs[1] and list(runs[0]) == ["c0", "c1", "c2"]
    sizes = [len(i) for i in runs[0].values()]
    assert sum(sizes) == 60 and sizes == sorted(sizes, reverse=True) and min(sizes) >= 1
    assert st.groups(spec, records, fresh[0]) == runs[0]  # from the cache


def test_lora_train_split_is_the_selected_subtask(paths):
    cfg = compose(["dataset=arc_easy", "dataset.subtasks.by=field", "dataset.subtasks.select=MCAS"])
    loaded = load_split(cfg.dataset, "train", data_dir=DATA_DIR)
    part = st.restrict(cfg.dataset, loaded, paths, limit=None)
    assert len(part.records) == 187 and all(r.id.startswith("MCAS_") for r in part.records)
    assert len(st.restrict(cfg.dataset, loaded, paths, limit=10).records) == 10
    whole = compose(["dataset=arc_easy"])
    assert len(st.restrict(whole.dataset, loaded, paths).records) == 2251
    bad = compose(["dataset=arc_easy", "dataset.subtasks.by=field", "dataset.subtasks.select=Nope"])
    with pytest.raises(ConfigError, match=r"no sub-task 'Nope'.*Mercury \(1419\), NYSEDREGENTS \(210\)"):
        st.restrict(bad.dataset, loaded, paths)
    off = compose(["dataset=arc_easy", "dataset.subtasks.select=MCAS"])
    with pytest.raises(ConfigError, match="subtasks.select=MCAS but subtasks.by is null"):
        st.restrict(off.dataset, loaded, paths)


def test_subtasks_of_a_converted_instruction_dataset_are_refused(paths):
    plain = compose(["dataset=arc_easy_instruct"])
    loaded = load_split(plain.dataset, "train", data_dir=DATA_DIR)
    assert not st.enabled(plain.dataset) and len(st.restrict(plain.dataset, loaded, paths).records) == 2251
    for override in ("dataset.mc.subtasks.by=field", "dataset.mc.subtasks.select=MCAS"):
        cfg = compose(["dataset=arc_easy_instruct", override])
        with pytest.raises(ConfigError, match=r"arc_easy_instruct: mc.subtasks.*dataset=arc_easy dataset.subtasks.by"):
            st.restrict(cfg.dataset, loaded, paths)
        with pytest.raises(ConfigError, match="not applied to converted instruction rows"):
            st.enabled(cfg.dataset)


def test_generator_prompts_of_a_subtask():
    from loragen.generator.prompts import dataset_prompts

    cfg = compose(["stage=generator", "dataset=commonsense6", "dataset.members.arc_easy.subtasks.by=field"])
    rows = [json.loads(line) for line in open(Path(DATA_DIR) / "arc_easy" / "train.jsonl") if line.strip()]
    want = [f"Question: {r['question']}\nAnswer:" for r in rows if r["id"].startswith("TIMSS")]
    assert dataset_prompts(cfg, "arc_easy@TIMSS", "train") == want and len(want) == 59
    with pytest.raises(ConfigError, match="its prompts come from the train split 'train'"):
        dataset_prompts(cfg, "arc_easy@TIMSS", "test")


def test_stage_data_prints_subtask_sizes(tmp_path, capsys):
    run_stage_in_process(["stage=data", "dataset=arc_challenge", "dataset.subtasks.by=field", "show.examples=0"],
                         run_dir=tmp_path)
    sizes = json.loads((tmp_path / "subtasks.json").read_text())["arc_challenge"]
    expected = exam_counts("arc_challenge", 50)
    assert expected == {"Mercury": 736, "MCAS": 97, "other": 286}
    assert sizes["tasks"] == {f"arc_challenge@{g}": n for g, n in expected.items()} and sizes["records"] == 1119
    assert "| arc_challenge | field | train (1119) | arc_challenge@MCAS | 97 |" in capsys.readouterr().out


# ---------------------------------------------------------------- the dnd recipe with sub-tasks

def fake_embeddings(texts, encoder_cfg, paths):
    """Four far-apart blobs by position (i mod 4): k-means (k=4) finds them, without loading MiniLM."""
    gen = torch.Generator().manual_seed(len(texts))
    return torch.eye(16)[torch.arange(len(texts)) % 4] * 10 + 0.01 * torch.randn(len(texts), 16, generator=gen)


def by_name(steps):
    return {s.name: s for s in steps}


def value(step, key):
    (v,) = [o.split("=", 1)[1] for o in step.overrides if o.split("=", 1)[0] == key]
    return v


ARC_E = [f"arc_easy@{g}" for g in ARC_E_MIN50]
ARC_C = [f"arc_challenge@{g}" for g in ("Mercury", "MCAS", "other")]
CLUSTERS = [f"@c{i}" for i in range(4)]


def test_dnd_steps_with_subtasks_one_heldout(monkeypatch):
    monkeypatch.setattr(st, "embeddings", fake_embeddings)
    cfg = compose(["experiment=dnd_minilm_subtasks"])  # held out: arc_challenge
    root = Path("/runs/x")
    steps = by_name(dnd.steps(cfg, root))
    others = [f"{d}{c}" for d in ("boolq", "piqa", "winogrande", "openbookqa") for c in CLUSTERS]
    loras = sorted(n[len("lora/"):] for n in steps if n.startswith("lora/"))
    assert loras == sorted(["arc_challenge", *ARC_E, *others])  # no arc_challenge@*: held out, nor whole others
    gen = steps["generator/arc_challenge"]
    tasks = [*ARC_E, "arc_challenge", *others]
    assert value(gen, "generator.datasets") == engine.quote(tasks) and value(gen, "generator.heldout") == "arc_challenge"
    assert sorted(gen.deps) == sorted(f"tokenize/{t}" for t in tasks)
    ev = steps["evaluate/arc_challenge"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        adapters = dict(engine.compose_step(ev, []).eval.adapters)  # {label: dir}; the label's first part: its role
    assert list(adapters) == ["oracle", "average", "nearest", "generated/gen-000", "generated/gen-001",
                              "generated/gen-002"]
    assert adapters["oracle"] == str(root / "lora" / "arc_challenge" / "final")
    assert not any("lora/arc_easy" in a for a in adapters.values()) and "lora/arc_challenge" in ev.deps
    assert not any(o.startswith("dataset.subtasks") for o in steps["lora/arc_challenge"].overrides)  # the oracle: whole

    # Each step's config, composed by Hydra as the engine will: lora trains on its sub-task, the generator
    # reads the members' sub-task settings and one token dir per task.
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        lora = engine.compose_step(steps["lora/arc_easy@MCAS"], [])
        g = engine.compose_step(gen, [])
    assert lora.dataset.subtasks.by == "field" and lora.dataset.subtasks.select == "MCAS"
    assert st.task_name(lora.dataset.name, st.selected(lora.dataset)) == "arc_easy@MCAS"
    assert list(g.generator.datasets) == tasks and g.generator.heldout == "arc_challenge"
    assert dict(g.generator.tokens) == {t: str(root / "tokenize" / t) for t in tasks}
    assert g.dataset.members.arc_easy.subtasks.by == "field" and g.dataset.members.boolq.subtasks.by == "kmeans"
    assert g.dataset.members.arc_challenge.subtasks.by is None  # held out: used whole


def test_dnd_steps_with_subtasks_leave_one_out(monkeypatch):
    monkeypatch.setattr(st, "embeddings", fake_embeddings)
    cfg = compose(["experiment=dnd_minilm_subtasks", "pipeline.dnd.heldout=null"])
    steps = by_name(dnd.steps(cfg, Path("/r")))
    names = list(cfg.pipeline.dnd.datasets)
    subs = {"arc_easy": ARC_E, "arc_challenge": ARC_C,
            **{d: [f"{d}{c}" for c in CLUSTERS] for d in ("boolq", "piqa", "winogrande", "openbookqa")}}
    assert sorted(n for n in steps if n.startswith("lora/")) == sorted(
        f"lora/{t}" for d in names for t in [d, *subs[d]])  # 6 whole (oracles) + 5 + 3 + 4 x 4 sub-tasks
    assert sum(n.startswith("lora/") for n in steps) == 30
    for h in names:
        tasks = engine.quote([t for d in names for t in ([h] if d == h else subs[d])])
        assert value(steps[f"generator/{h}"], "generator.datasets") == tasks
        assert f"{h}@" not in tasks
    assert steps["lora/piqa@c2"].overrides[:3] == ["stage=lora", "model=minilm", "dataset=piqa"]
    assert "select:'c2'" in value(steps["lora/piqa@c2"], "dataset.subtasks")


def test_dnd_steps_without_subtasks_are_unchanged():
    cfg = compose(["experiment=dnd_minilm"])
    steps = by_name(dnd.steps(cfg, Path("/r")))
    names = list(cfg.pipeline.dnd.datasets)
    assert sorted(n for n in steps if n.startswith("lora/")) == sorted(f"lora/{d}" for d in names)
    gen = steps["generator/arc_challenge"]
    assert value(gen, "generator.datasets") == engine.quote(names)
    assert not any(o.startswith("dataset.") for o in gen.overrides)
    adapters = value(steps["evaluate/arc_challenge"], "eval.adapters")
    assert all(f"/r/lora/{d}/final" in adapters for d in names)  # every dataset's LoRA, as before


def test_experiment_config_composes():
    cfg = compose(["experiment=dnd_minilm_subtasks"])
    base = compose(["experiment=dnd_minilm"])
    assert cfg.pipeline == base.pipeline and cfg.stage.name == "pipeline" and cfg.dataset.name == "commonsense6"
    by = {n: (m.subtasks.by, m.subtasks.k) for n, m in cfg.dataset.members.items()}
    assert by == {"arc_easy": ("field", 4), "arc_challenge": ("field", 4), "boolq": ("kmeans", 4),
                  "piqa": ("kmeans", 4), "winogrande": ("kmeans", 4), "openbookqa": ("kmeans", 4)}
    assert all(m.subtasks.select is None and m.subtasks.encoder.name == "minilm" for m in cfg.dataset.members.values())
    assert base.dataset.members.arc_easy.subtasks.by is None


def test_quote_dicts():
    assert engine.quote({"a@b": "/x y", "n": None, "l": [1]}) == "{a@b:'/x y',n:null,l:[1]}"


def test_dry_run_lists_steps(tmp_path):
    proc = run_cli(["experiment=dnd_minilm_subtasks", "pipeline.dry_run=true", "pipeline.dnd.datasets=[arc_easy,arc_challenge]",
                    "dataset.members.arc_easy.subtasks.min_size=300", f"hydra.run.dir={tmp_path}"])
    # arc_easy with min_size 300: Mercury (1419) and other (832); arc_challenge held out, whole.
    assert "10 steps (pipeline.dry_run=true: none run)" in proc.stdout
    assert "generator/arc_challenge  <- tokenize/arc_easy@Mercury, tokenize/arc_easy@other, tokenize/arc_challenge" \
        in proc.stdout
    assert not (tmp_path / "lora").exists()


@pytest.mark.slow
def test_dnd_recipe_with_subtasks_end_to_end(tmp_path):
    """Tiny settings: ARC-Easy in two exam groups, ARC-Challenge whole, PIQA held out."""
    run = tmp_path / "dnd"
    run_cli(["experiment=dnd_minilm_subtasks", "+debug=tiny", f"hydra.run.dir={run}",
             "dataset.members.arc_easy.subtasks.min_size=300", "dataset.members.arc_challenge.subtasks.by=null",
             f"paths.cache_dir={tmp_path / 'cache'}"])
    trainer = json.loads((run / "lora" / "arc_easy@other" / "state" / "trainer.json").read_text())
    assert trainer["fingerprint"]["dataset"] == "arc_easy@other"
    metrics = json.loads((run / "generator" / "piqa" / "metrics.json").read_text())
    assert metrics["datasets"] == ["arc_easy@Mercury", "arc_easy@other", "arc_challenge"]
    (row,) = json.loads((run / "table.json").read_text())["rows"]
    results = {e["adapter_path"]: e for e in json.loads((run / "evaluate" / "piqa" / "results.json").read_text())["results"]}
    assert row["train_tasks"] == 3 and row["oracle"] == results[str(run / "lora" / "piqa" / "final")]["acc"]
    assert row["nearest_dataset"] in metrics["datasets"]
    assert "| piqa (validation@eval, 30) | 3 |" in (run / "table.md").read_text()
