"""stage=tokenize: LoRA checkpoints <-> tokens, both schemes, the layout, bad inputs, analyze."""

import json
import math
import os
import pickle
import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from peft import PeftModel, get_peft_model_state_dict
from safetensors.torch import load_file

from loragen.bench.tokenize import MODULES, qwen_lora_shapes, random_qwen_adapter
from loragen.errors import CheckpointError, ConfigError
from loragen.lora.adapter_io import Adapter, read_adapter, write_adapter
from loragen.lora.init import attach_lora
from loragen.lora.tokenize import (
    Layout,
    default_chunk,
    detokenize,
    find_checkpoints,
    load_token_set,
    tokenize_adapters,
    tokenize_checkpoints,
)
from loragen.lora.tokenize.analyze import analyze_checkpoints
from loragen.lora.tokenize.codec import single_thread
from loragen.models import load_model
from tests.conftest import CONF, run_cli


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small tensor ops are much faster on one thread on the shared 2-core machine."""
    with single_thread():
        yield


MINILM = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


def model_cfg(name):
    return OmegaConf.load(CONF / "model" / f"{name}.yaml")


def tiny_adapter(paths, name, seed, r=4):
    """attach_lora on all seven modules, lora_B random non-zero (seeded); returns (peft model, Adapter)."""
    pm = attach_lora(load_model(model_cfg(name), paths).model, r=r, alpha=2 * r, dropout=0.0, target_modules=MODULES,
                     init_seed=0)
    g = torch.Generator().manual_seed(seed)
    for n, p in pm.named_parameters():
        if "lora_B" in n:
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return pm, Adapter(pm.peft_config["default"].to_dict(), get_peft_model_state_dict(pm))


def assert_round_trip(orig: Adapter, back: Adapter, chunk=None):
    assert back.config == orig.config
    assert list(back.tensors) and set(back.tensors) == set(orig.tensors)
    for k, x in orig.tensors.items():
        y = back.tensors[k]
        assert y.shape == x.shape and y.dtype == x.dtype, k
        err, scale = (y.float() - x.float()).abs(), x.float().abs()
        if chunk:  # per dnd chunk: error <= 1e-6 of the chunk's largest magnitude
            long = x.T if k.endswith("lora_B.weight") else x
            e_long = err.T if k.endswith("lora_B.weight") else err
            for s in range(0, long.shape[1], chunk):
                assert e_long[:, s : s + chunk].max() <= 1e-6 * long[:, s : s + chunk].abs().max(), (k, s)
        else:
            assert err.max() <= 1e-6 * scale.max(), k


def test_default_chunk_rule():
    assert [default_chunk(h) for h in (896, 1536, 3584, 2304, 384, 64, 48)] == [128, 256, 512, 256, 64, 16, 8]


def test_qwen05b_dnd_gives_4296_tokens_of_10x130_and_round_trips():
    ads = [random_qwen_adapter(0), random_qwen_adapter(1)]
    ads[1].tensors["base_model.model.model.layers.3.mlp.up_proj.lora_B.weight"].zero_()  # a constant chunk
    ts = tokenize_adapters(ads, modules=MODULES, scheme="dnd")
    assert ts.tokens.shape == (2, 4296, 10, 130) and ts.layout.chunk == 128
    assert ts.layout.num_tokens // 24 == 179 and ts.mask.all()
    assert ts.layout.num_tokens * 8 * 128 == sum(math.prod(s) for s in qwen_lora_shapes().values()) == 4_399_104
    # token 0 is layer 0 q_proj lora_A[:, :128], z-scored, with its stats in the border (checked by hand)
    a = ads[0].tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"][:, :128].double()
    m, s = a.mean(), a.std(correction=0)
    tok = ts.tokens[0, 0].double()
    assert torch.allclose(tok[1:9, 1:129], (a - m) / s, atol=1e-4)
    assert torch.allclose(tok[0], 8 * m.expand(130).double(), atol=1e-7)
    assert torch.allclose(tok[9], (torch.log(0.9 * s + 0.1) + 1.6).expand(130), atol=1e-6)
    # the 8th token is the first chunk of q_proj's lora_B transposed, the 15th starts k_proj
    b = ads[0].tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].T[:, :128].double()
    assert torch.allclose(ts.tokens[0, 7, 1:9, 1:129].double(), (b - b.mean()) / b.std(correction=0), atol=1e-4)
    for i, ad in enumerate(ads):
        assert_round_trip(ad, detokenize(ts.tokens[i], ts.layout), chunk=128)
    zero = detokenize(ts.tokens[1], ts.layout).tensors["base_model.model.model.layers.3.mlp.up_proj.lora_B.weight"]
    assert torch.count_nonzero(zero) == 0 and torch.isfinite(ts.tokens).all()


def test_qwen05b_flat_round_trips_with_stats_in_layout():
    ads = [random_qwen_adapter(2), random_qwen_adapter(3)]
    ts = tokenize_adapters(ads, modules=MODULES, scheme="flat", token_shape=[8, 50])
    assert ts.tokens.shape == (2, math.ceil(4_399_104 / 400), 8, 50)
    assert int(ts.mask.sum()) == 4_399_104 and ts.tokens[:, ~ts.mask].abs().max() == 0
    slot = ts.layout.tensors[0]
    both = torch.stack([a.tensors[slot.name] for a in ads]).double()
    assert slot.name.endswith("layers.0.self_attn.q_proj.lora_A.weight")
    assert slot.mean == pytest.approx(both.mean().item(), abs=1e-9) and slot.std == pytest.approx(both.std(correction=0).item(), rel=1e-6)
    layout = Layout.from_dict(json.loads(json.dumps(ts.layout.to_dict())))  # via JSON, as the generator reads it
    for i, ad in enumerate(ads):
        assert_round_trip(ad, detokenize(ts.tokens[i], layout))


def test_bf16_adapters_round_trip_exactly():
    ad = random_qwen_adapter(4, dtype=torch.bfloat16)
    for scheme in ("dnd", "flat"):
        ts = tokenize_adapters([ad], modules=MODULES, scheme=scheme)
        back = detokenize(ts.tokens[0], ts.layout)
        assert all(torch.equal(back.tensors[k], v) for k, v in ad.tensors.items())


@pytest.mark.parametrize("name", ["tiny_qwen2", "tiny_llama", "tiny_gemma2"])
def test_tiny_round_trip_loads_in_peft_with_same_logits(paths, tmp_path, name):
    pm, ad = tiny_adapter(paths, name, seed=1)
    ad2 = tiny_adapter(paths, name, seed=2)[1]
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        expected = pm(ids).logits
    for scheme in ("dnd", "flat"):
        ts = tokenize_adapters([ad, ad2], modules=MODULES, scheme=scheme)
        assert_round_trip(ad, detokenize(ts.tokens[0], ts.layout), chunk=ts.layout.chunk or None)
        write_adapter(tmp_path / scheme, detokenize(ts.tokens[0], ts.layout))
        with torch.no_grad():
            loaded = PeftModel.from_pretrained(load_model(model_cfg(name), paths).model, tmp_path / scheme).eval()
            assert torch.allclose(loaded(ids).logits, expected, atol=1e-5), scheme
    assert not torch.allclose(load_model(model_cfg(name), paths).model(ids).logits, expected, atol=1e-3)


def test_padded_chunks_are_masked_and_round_trip(paths):
    ad = tiny_adapter(paths, "tiny_gemma2", seed=3)[1]  # hidden 48, kv 24, intermediate 96
    ts = tokenize_adapters([ad], modules=MODULES, scheme="dnd", chunk=20)
    # ceil(long axis / 20) for A then B^T: q 48,48 | k 48,24 | v 48,24 | o 48,48 | up 48,96 | gate 48,96 | down 96,48
    per_layer = (3 + 3) + (3 + 2) + (3 + 2) + (3 + 3) + (3 + 5) + (3 + 5) + (5 + 3)
    assert ts.layout.num_tokens == 3 * per_layer
    data_cells = sum(v.numel() for v in ad.tensors.values())
    assert int(ts.mask.sum()) == data_cells + ts.layout.num_tokens * (2 * 22 + 2 * 4)
    assert ts.tokens[0][~ts.mask].abs().max() == 0
    assert_round_trip(ad, detokenize(ts.tokens[0], ts.layout), chunk=20)


def test_minilm_module_order_uses_longest_suffix():
    shapes = {}
    for layer in (1, 0):
        for m, (i, o) in reversed(list({"attention.self.query": (384, 384), "attention.self.key": (384, 384),
                                         "attention.self.value": (384, 384), "attention.output.dense": (384, 384),
                                         "intermediate.dense": (384, 1536), "output.dense": (1536, 384)}.items())):
            p = f"base_model.model.encoder.layer.{layer}.{m}"
            shapes[p + ".lora_B.weight"], shapes[p + ".lora_A.weight"] = (o, 8), (8, i)
    g = torch.Generator().manual_seed(0)
    ad = Adapter({"r": 8, "target_modules": MINILM}, {k: torch.randn(s, generator=g) for k, s in shapes.items()})
    ts = tokenize_adapters([ad], modules=MINILM, scheme="dnd")
    names = [s.name.removeprefix("base_model.model.encoder.layer.") for s in ts.layout.tensors]
    assert names[:12:2] == ["0.attention.self.query.lora_A.weight", "0.attention.self.key.lora_A.weight",
                            "0.attention.self.value.lora_A.weight", "0.attention.output.dense.lora_A.weight",
                            "0.intermediate.dense.lora_A.weight", "0.output.dense.lora_A.weight"]
    assert names[1] == "0.attention.self.query.lora_B.weight" and names[12].startswith("1.attention.self.query")
    assert ts.layout.chunk == 64 and ts.layout.token_shape == [10, 66]
    assert_round_trip(ad, detokenize(ts.tokens[0], ts.layout), chunk=64)


def make_run_dir(root: Path, steps, names=None):
    """A lora run dir: checkpoints/<name> for each step plus final/; returns {step: Adapter}."""
    ads = {}
    for i, step in enumerate(steps):
        ad = random_qwen_adapter(10 + i, layers=1)  # one layer keeps it small
        ads[step] = ad
        write_adapter(root / "checkpoints" / (names[i] if names else f"step-{step}"), ad)
    write_adapter(root / "final", random_qwen_adapter(99, layers=1))
    return ads


def test_checkpoints_are_ordered_by_step_not_listing(tmp_path):
    make_run_dir(tmp_path, [100, 2, 10, 30])
    assert [c.step for c in find_checkpoints(tmp_path)] == [2, 10, 30, 100]
    assert [c.path.name for c in find_checkpoints(tmp_path, 2)] == ["step-30", "step-100"]
    assert [c.step for c in find_checkpoints(tmp_path / "checkpoints")] == [2, 10, 30, 100]


def test_stage_writes_tokens_layout_and_token_std(tmp_path):
    ads = make_run_dir(tmp_path / "run", [100, 2, 10])
    out = tmp_path / "out"
    run_cli(["stage=tokenize", "model=qwen2.5-0.5b", f"tokenize.checkpoints={tmp_path / 'run'}",
             "tokenize.max_checkpoints=2", f"hydra.run.dir={out}"])
    ts = load_token_set(out)
    assert ts.steps == [10, 100] and ts.tokens.shape == (2, 179, 10, 130)
    raw = load_file(str(out / "tokens.safetensors"))
    assert set(raw) == {"tokens", "mask", "token_std", "steps", "chunk_mean", "chunk_std"}
    for i, step in enumerate([10, 100]):
        assert_round_trip(ads[step], detokenize(ts.tokens[i], ts.layout), chunk=128)
    expected = (ts.tokens[1] - ts.tokens[0]).abs() / 2  # std of two values, per cell
    assert torch.allclose(ts.token_std, expected.mean((1, 2)), rtol=1e-4, atol=1e-7)
    a = ads[100].tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"][:, :128].double()
    assert ts.chunk_std[1, 0].item() == pytest.approx(a.std(correction=0).item(), rel=1e-5)
    assert json.loads((out / "layout.json").read_text())["adapter_config"] == ads[10].config


def test_analyze_reports_norms_rank_and_cosine(tmp_path):
    shapes = {k: s for k, s in qwen_lora_shapes(r=4).items() if ".layers.0.self_attn.q_proj" in k}
    g = torch.Generator().manual_seed(0)
    a = torch.randn(shapes[next(k for k in shapes if "lora_A" in k)], generator=g)
    bs = [torch.randn(896, 4, generator=g), torch.zeros(896, 4)]
    bs[1][:, :2] = torch.randn(896, 2, generator=g)  # rank 2
    for step, b in zip((5, 7), bs, strict=True):
        write_adapter(tmp_path / f"step-{step}", config={"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]},
                      tensors={k: (a if "lora_A" in k else b) for k in shapes})
    rows = analyze_checkpoints(find_checkpoints(tmp_path))
    dw = [2.0 * (b.double() @ a.double()) for b in bs]
    assert [r["rank"] for r in rows] == [4, 2]
    assert rows[1]["dw_norm"] == pytest.approx(dw[1].norm().item(), rel=1e-9)
    cos = (dw[0] * dw[1]).sum() / (dw[0].norm() * dw[1].norm())
    assert rows[0]["cos_prev"] is None and rows[1]["cos_prev"] == pytest.approx(cos.item(), rel=1e-9)
    proc = run_cli(["stage=tokenize", "tokenize.analyze=true", f"tokenize.checkpoints={tmp_path}",
                    f"hydra.run.dir={tmp_path / 'out'}"])
    assert "| model.layers.0.self_attn.q_proj |" in proc.stdout and (tmp_path / "out" / "analysis.json").is_file()


# ---- bad input -------------------------------------------------------------------------------

def two_checkpoints(root: Path, edit) -> Path:
    """step-1 fine, step-2 changed by edit(config, tensors)."""
    for step in (1, 2):
        ad = random_qwen_adapter(step, r=2, layers=1)
        ad.tensors = {k: v for k, v in ad.tensors.items() if ".self_attn." in k}
        if step == 2:
            edit(ad.config, ad.tensors)
        write_adapter(root / f"step-{step}", ad)
    return root


def test_mismatched_rank_names_file_and_key(tmp_path):
    def edit(c, t):
        c["r"] = 4
    two_checkpoints(tmp_path, edit)
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'step-2'}: adapter_config r=4 differs from 2"):
        tokenize_checkpoints(tmp_path, modules=MODULES)


def test_mismatched_target_modules_and_shapes_name_file_and_key(tmp_path):
    two_checkpoints(tmp_path / "t", lambda c, t: c.update(target_modules=["q_proj"]))
    with pytest.raises(CheckpointError, match=r"step-2: adapter_config target_modules=\['q_proj'\] differs"):
        tokenize_checkpoints(tmp_path / "t", modules=MODULES)
    key = "base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"
    two_checkpoints(tmp_path / "s", lambda c, t: t.update({key: torch.zeros(64, 2)}))
    with pytest.raises(CheckpointError, match=rf"step-2/adapter_model.safetensors: tensor {key} is float32 \[64, 2\], "
                                              r"expected float32 \[128, 2\]"):
        tokenize_checkpoints(tmp_path / "s", modules=MODULES)
    two_checkpoints(tmp_path / "m", lambda c, t: t.pop(key))
    with pytest.raises(CheckpointError, match=f"step-2/adapter_model.safetensors: tensor {key} is missing"):
        tokenize_checkpoints(tmp_path / "m", modules=MODULES)


def test_a_truncated_later_checkpoint_is_reported_before_any_work(tmp_path):
    """check_consistent parses only the first header when the others are byte-equal to it; a later file with that
    header but cut short is still named by the check, before any tensor is read."""
    from loragen.lora.tokenize import check_consistent, find_checkpoints

    for step in (1, 2, 3):
        write_adapter(tmp_path / f"step-{step}", random_qwen_adapter(step, r=2, layers=1))
    assert check_consistent(find_checkpoints(tmp_path)).shapes  # untouched: consistent
    f = tmp_path / "step-3" / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=f"{f}: cannot read safetensors file"):
        check_consistent(find_checkpoints(tmp_path))


def test_truncated_safetensors_is_named_and_nothing_written(tmp_path):
    two_checkpoints(tmp_path / "c", lambda c, t: None)
    f = tmp_path / "c" / "step-2" / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=f"{f}: cannot read safetensors file"):
        tokenize_checkpoints(tmp_path / "c", modules=MODULES)
    proc = run_cli(["stage=tokenize", "model=qwen2.5-0.5b", f"tokenize.checkpoints={tmp_path / 'c'}",
                    f"hydra.run.dir={tmp_path / 'out'}"], check=False)
    assert proc.returncode == 2 and f"{f}: cannot read safetensors file" in proc.stderr
    assert not (tmp_path / "out" / "tokens.safetensors").exists() and not (tmp_path / "out" / "layout.json").exists()


class Evil:
    def __reduce__(self):
        return (os.system, (f"touch {Path(os.environ.get('EVIL_MARK', '/tmp/loragen-evil'))}",))


def test_pickle_checkpoint_is_loaded_weights_only(tmp_path):
    mark = tmp_path / "pwned"
    os.environ["EVIL_MARK"] = str(mark)
    d = tmp_path / "step-1"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"r": 2, "target_modules": ["q_proj"]}))
    (d / "adapter_model.bin").write_bytes(pickle.dumps({"x.lora_A.weight": Evil()}))
    with pytest.raises(CheckpointError, match=f"{d / 'adapter_model.bin'}: cannot load with weights_only=True"):
        tokenize_checkpoints(tmp_path, modules=MODULES)
    assert not mark.exists()
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    torch.save({f"{key}.lora_A.weight": torch.ones(2, 8), f"{key}.lora_B.weight": torch.ones(8, 2)}, d / "adapter_model.bin")
    ts = tokenize_checkpoints(tmp_path, modules=MODULES, chunk=4)
    assert torch.equal(detokenize(ts.tokens[0], ts.layout).tensors[f"{key}.lora_B.weight"], torch.ones(8, 2))


def test_non_finite_values_name_file_and_tensor(tmp_path):
    key = "base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight"

    def edit(c, t):
        t[key][1, 3] = float("inf")
    two_checkpoints(tmp_path, edit)
    with pytest.raises(CheckpointError, match=f"step-2/adapter_model.safetensors: tensor {key} has non-finite values"):
        tokenize_checkpoints(tmp_path, modules=MODULES)


@pytest.mark.parametrize("value", [1e38, 2e19])
def test_finite_values_whose_chunk_statistics_overflow_name_file_and_tensor(tmp_path, value):
    """A diverged run's finite but huge values: the chunk's mean code (mean * 8 at 1e38) or its variance (2e19^2)
    overflows float32. A CheckpointError names the file and tensor (it was a StopIteration traceback)."""
    key = "base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"

    def edit(c, t):
        t[key][5, :] = value
    two_checkpoints(tmp_path, edit)
    with pytest.raises(CheckpointError, match=f"step-2/adapter_model.safetensors: tensor {key} has values too large "
                                              + re.escape(f"to tokenize (up to {value:.3g}")):
        tokenize_checkpoints(tmp_path, modules=MODULES)


def test_other_bad_inputs_are_named(tmp_path):
    two_checkpoints(tmp_path / "ok", lambda c, t: None)
    with pytest.raises(ConfigError, match=r"module 'self_attn.._proj' is not in model.linear_modules \['query'"):
        tokenize_checkpoints(tmp_path / "ok", modules=MINILM)
    with pytest.raises(ConfigError, match=r"tokenize.scheme='zip'; expected one of \('dnd', 'flat'\)"):
        tokenize_checkpoints(tmp_path / "ok", modules=MODULES, scheme="zip")
    with pytest.raises(ConfigError, match=r"tokenize.token_shape=\[8\]; expected two positive sizes"):
        tokenize_checkpoints(tmp_path / "ok", modules=MODULES, scheme="flat", token_shape=[8])
    with pytest.raises(CheckpointError, match="no such directory"):
        tokenize_checkpoints(tmp_path / "nope", modules=MODULES)
    write_adapter(tmp_path / "named" / "best", read_adapter(tmp_path / "ok" / "step-1"))
    write_adapter(tmp_path / "named" / "step-3", read_adapter(tmp_path / "ok" / "step-1"))
    with pytest.raises(CheckpointError, match="best: cannot order this checkpoint, its name has no step number"):
        find_checkpoints(tmp_path / "named")
    ts = tokenize_checkpoints(tmp_path / "ok", modules=MODULES)
    with pytest.raises(CheckpointError, match=r"tokens of shape \[3, 4, 130\] do not fit the layout \[44, 4, 130\]"):
        detokenize(ts.tokens[0, :3], ts.layout)
    proc = run_cli(["stage=tokenize", f"hydra.run.dir={tmp_path / 'out'}"], check=False)
    assert proc.returncode == 2 and "tokenize.checkpoints is not set" in proc.stderr


def test_seq2seq_t5_round_trip_loads_in_peft_with_same_logits(paths, tmp_path):
    """tiny_t5: encoder and decoder blocks share layer numbers and the decoder has two attentions (self and
    cross) with the same module names; every tensor must come back to its own key."""
    modules = list(model_cfg("tiny_t5").linear_modules)

    def adapter(seed):
        pm = attach_lora(load_model(model_cfg("tiny_t5"), paths).model, r=4, alpha=8, dropout=0.0,
                         target_modules=modules, init_seed=0)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        return pm, Adapter(pm.peft_config["default"].to_dict(), get_peft_model_state_dict(pm))

    pm, ad = adapter(1)
    ad2 = adapter(2)[1]
    # 2 encoder blocks x (q,k,v,o,wi_0,wi_1,wo) + 2 decoder blocks x (self q,k,v,o + cross q,k,v,o + wi_0,wi_1,wo)
    assert len(ad.tensors) == 2 * (2 * 7 + 2 * 11)
    ids, dec = torch.tensor([[5, 6, 7, 8, 9]]), torch.tensor([[0, 11, 12]])
    with torch.no_grad():
        expected = pm(input_ids=ids, decoder_input_ids=dec).logits
    for scheme in ("dnd", "flat"):
        ts = tokenize_adapters([ad, ad2], modules=modules, scheme=scheme)
        back = detokenize(ts.tokens[0], ts.layout)
        assert_round_trip(ad, back, chunk=ts.layout.chunk or None)
        write_adapter(tmp_path / scheme, back)
        with torch.no_grad():
            loaded = PeftModel.from_pretrained(load_model(model_cfg("tiny_t5"), paths).model, tmp_path / scheme).eval()
            assert torch.allclose(loaded(input_ids=ids, decoder_input_ids=dec).logits, expected, atol=1e-5), scheme
    base = load_model(model_cfg("tiny_t5"), paths).model
    assert not torch.allclose(base(input_ids=ids, decoder_input_ids=dec).logits, expected, atol=1e-3)


# ---- grouped reading (StackedReader) and batched encoding ----------------------------------------------------

def write_trajectory(root: Path, n: int, edit=None) -> list[Path]:
    """n one-layer Qwen2.5-0.5B-shaped checkpoints step-1..n; edit(i, tensors) may change checkpoint i's tensors."""
    paths = []
    for i in range(n):
        ad = random_qwen_adapter(20 + i, layers=1)
        if edit:
            edit(i, ad.tensors)
        paths.append(write_adapter(root / f"step-{i + 1}", ad))
    return paths


def per_checkpoint(paths: list[Path], **kw):
    """The reference: each checkpoint read by safetensors' load_file and encoded on its own (tokenize_adapters)."""
    return tokenize_adapters([read_adapter(p) for p in paths], modules=MODULES, **kw)


@pytest.fixture
def small_groups(monkeypatch):
    """Groups of 3 checkpoints, and a record of what every StackedReader.read returned."""
    from loragen.lora.adapter_io import StackedReader
    from loragen.lora.tokenize import token_set

    monkeypatch.setattr(token_set, "GROUP_CHECKPOINTS", 3)
    reads: list[tuple[list[str], bool]] = []
    read = StackedReader.read

    def spy(self, files):
        out = read(self, files)
        reads.append(([Path(f).parent.name for f in files], out is not None))
        return out
    monkeypatch.setattr(StackedReader, "read", spy)
    return reads


def assert_same_token_sets(got, expected):
    for field in ("tokens", "token_std", "chunk_mean", "chunk_std"):
        a, b = getattr(got, field), getattr(expected, field)
        assert (a is None and b is None) or torch.equal(a, b), field
    assert got.layout.to_dict() == expected.layout.to_dict()  # flat: the normalisation statistics too


@pytest.mark.parametrize("chunk", [None, 100])  # 100: padded chunks (var_mean of the real cells, one by one)
def test_grouped_reading_equals_per_checkpoint_encoding(tmp_path, small_groups, chunk):
    paths = write_trajectory(tmp_path, 10)
    ts = tokenize_checkpoints(tmp_path, modules=MODULES, chunk=chunk)
    assert small_groups == [(["step-1", "step-2", "step-3"], True), (["step-4", "step-5", "step-6"], True),
                            (["step-7", "step-8", "step-9"], True), (["step-10"], True)]
    assert_same_token_sets(ts, per_checkpoint(paths, chunk=chunk))


def test_a_checkpoint_with_another_header_is_read_on_its_own(tmp_path, small_groups):
    """step-4's safetensors metadata differs (same file size, other header bytes): its group falls back to
    read_adapter, one checkpoint at a time; the tokens are the same."""
    from safetensors.torch import save_file

    paths = write_trajectory(tmp_path, 6)
    f = paths[3] / "adapter_model.safetensors"
    size = f.stat().st_size
    save_file(read_adapter(paths[3]).tensors, str(f), metadata={"format": "tp"})
    other = (paths[2] / "adapter_model.safetensors").read_bytes()
    assert f.stat().st_size == size and f.read_bytes()[:200] != other[:200]
    ts = tokenize_checkpoints(tmp_path, modules=MODULES)
    assert small_groups == [(["step-1", "step-2", "step-3"], True), (["step-4", "step-5", "step-6"], False)]
    assert_same_token_sets(ts, per_checkpoint(paths))


def test_a_checkpoint_of_another_size_is_read_on_its_own(tmp_path, small_groups):
    from safetensors.torch import save_file

    paths = write_trajectory(tmp_path, 5)
    save_file(read_adapter(paths[2]).tensors, str(paths[2] / "adapter_model.safetensors"),
              metadata={"format": "pt", "note": "longer metadata"})
    ts = tokenize_checkpoints(tmp_path, modules=MODULES, scheme="flat")
    assert small_groups == [(["step-1", "step-2", "step-3"], False), (["step-4", "step-5"], True)]
    assert_same_token_sets(ts, per_checkpoint(paths, scheme="flat"))


def test_stacked_reader_views_are_the_files_tensors(tmp_path):
    from loragen.lora.adapter_io import StackedReader

    paths = write_trajectory(tmp_path, 3, edit=lambda i, t: t.update(
        {k: v.to(torch.bfloat16) for k, v in t.items() if "lora_B" in k}))
    reader = StackedReader()
    views = reader.read([p / "adapter_model.safetensors" for p in paths])
    assert views is not None
    for i, p in enumerate(paths):
        ref = load_file(str(p / "adapter_model.safetensors"))
        assert views.keys() == ref.keys()
        for k, v in ref.items():
            assert views[k][i].dtype == v.dtype and torch.equal(views[k][i], v), k
    assert reader.read([paths[0] / "adapter_model.safetensors", tmp_path / "nope"]) is None


def corrupt_header(f: Path, old: bytes, new: bytes) -> None:
    """Replace bytes in f's header, keeping its size."""
    raw = f.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert len(old) == len(new) and old in raw[8 : 8 + n]
    f.write_bytes(raw[:8] + raw[8 : 8 + n].replace(old, new, 1) + raw[8 + n :])


@pytest.mark.parametrize("how", ["header length", "json", "entry", "offsets", "shape"])
def test_stacked_reader_names_a_corrupt_file(tmp_path, how):
    """The first file's header is the one parsed (the others are compared with it byte for byte)."""
    from loragen.lora.adapter_io import StackedReader

    paths = write_trajectory(tmp_path, 2)
    f = paths[0] / "adapter_model.safetensors"
    raw = f.read_bytes()
    data_len = len(raw) - 8 - int.from_bytes(raw[:8], "little")
    if how == "header length":
        f.write_bytes((len(raw) - 4).to_bytes(8, "little") + raw[8:])
    elif how == "json":
        corrupt_header(f, b"{", b"[")
    elif how == "entry":
        corrupt_header(f, b'"dtype"', b'"dtypo"')
    elif how == "offsets":  # the last tensor ends past the data section
        corrupt_header(f, f",{data_len}]".encode(), f",{data_len + 4}]".encode())
    else:
        corrupt_header(f, b'"shape":[8,896]', b'"shape":[8,895]')
    why = {"header length": "header length", "json": "header is not", "entry": "malformed header entry",
           "offsets": "outside the", "shape": "does not fill"}[how]
    with pytest.raises(CheckpointError, match=f"{f}: cannot read safetensors file .*{why}"):
        StackedReader().read([f, paths[1] / "adapter_model.safetensors"])


def test_a_file_truncated_after_the_header_check_is_named(tmp_path, small_groups, monkeypatch):
    """The headers are checked before any tensor is read, but a file can change in between: the reader names it."""
    from loragen.lora.tokenize import token_set

    paths = write_trajectory(tmp_path, 9)
    f = paths[7] / "adapter_model.safetensors"
    check = token_set.check_consistent

    def check_then_truncate(ckpts):
        header = check(ckpts)
        f.write_bytes(f.read_bytes()[:-100])
        return header
    monkeypatch.setattr(token_set, "check_consistent", check_then_truncate)
    with pytest.raises(CheckpointError, match=f"{f}: cannot read safetensors file"):
        tokenize_checkpoints(tmp_path, modules=MODULES)


@pytest.mark.parametrize("scheme", ["dnd", "flat"])
def test_non_finite_value_in_a_group_names_its_checkpoint(tmp_path, small_groups, scheme):
    key = "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"

    def edit(i, t):
        if i == 4:  # the second of its group
            t[key][5, 1] = float("nan")
    write_trajectory(tmp_path, 6, edit)
    with pytest.raises(CheckpointError,
                       match=f"{tmp_path / 'step-5' / 'adapter_model.safetensors'}: tensor {key} has non-finite"):
        tokenize_checkpoints(tmp_path, modules=MODULES, scheme=scheme)
    assert small_groups[1] == (["step-4", "step-5", "step-6"], True)


def test_block_codes_equal_encode_then_decode_stats_bit_for_bit():
    """The encoder's fused codes equal the reference pair encode_stats -> decode_stats -> fp32 on every value class:
    tiny and subnormal means (mean code / 8 rounds), huge ones (mean * 8 overflows), zero and floored variances."""
    from loragen.lora.tokenize.codec import _block_codes, decode_stats, encode_stats

    g = torch.Generator().manual_seed(0)
    tiny = torch.tensor([1e-45, -3e-45, 1.1754942e-38, 2.5e-39, 0.0, -0.0])
    huge = torch.tensor([3.4e38, -4.3e37, 4.2e37, 1e30])
    mean = torch.cat([tiny, huge, torch.randn(200, generator=g) * torch.logspace(-30, 3, 200)])
    var = torch.cat([torch.tensor([0.0, 1e-45, 1e-20, 1e-16, 1e30]), torch.rand(mean.numel() - 5, generator=g)
                     * torch.logspace(-20, 4, mean.numel() - 5)])
    mean, var = mean.view(2, -1), var.view(2, -1)
    mean_q, std_q = torch.empty(2, 300).fill_(float("nan")), torch.empty(2, 300).fill_(float("nan"))
    codes = _block_codes(mean, var, mean_q[:, 10:115], std_q[:, 10:115])
    expected = encode_stats(mean, var.sqrt())
    for got, want in zip(codes, expected, strict=True):
        assert torch.equal(got.view(torch.int32), want.view(torch.int32))
    for got, want in zip((mean_q[:, 10:115], std_q[:, 10:115]), decode_stats(*expected), strict=True):
        assert torch.equal(got.view(torch.int32), want.float().view(torch.int32))
    assert mean_q[:, :10].isnan().all() and std_q[:, 115:].isnan().all()  # only its slice written


def test_encode_dnd_of_k_checkpoints_equals_one_at_a_time():
    from loragen.lora.tokenize import codec

    ads = [random_qwen_adapter(30 + i, layers=1) for i in range(3)]
    layout = tokenize_adapters(ads[:1], modules=MODULES, chunk=100).layout
    one = torch.full((3, *layout.shape), float("nan"))
    stats = [codec.encode_dnd(a.tensors, layout, one[i]) for i, a in enumerate(ads)]
    batched = torch.full((3, *layout.shape), float("nan"))
    stacked = {k: torch.stack([a.tensors[k] for a in ads]) for k in ads[0].tensors}
    mean, std = codec.encode_dnd(stacked, layout, batched, blocks=codec.token_blocks(layout, 7))
    assert torch.equal(batched, one)  # every cell written (no NaN left) and equal
    assert torch.equal(mean, torch.stack([m for m, _ in stats]))
    assert torch.equal(std, torch.stack([s for _, s in stats]))


def test_token_std_on_two_threads_is_bit_equal():
    from loragen.lora.tokenize.token_set import token_std

    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(7, 300, 4, 6, generator=g) * torch.rand(300, 1, 1, generator=g)
    mask = torch.rand(300, 4, 6, generator=g) > 0.1
    expected = token_std(tokens, mask, block_tokens=16)
    for threads in (2, 3):
        assert torch.equal(token_std(tokens, mask, block_tokens=16, threads=threads), expected)
    direct = (tokens.double().std(0, correction=0) * mask).flatten(1).sum(1) / mask.flatten(1).sum(1)
    assert torch.allclose(expected.double(), direct, rtol=1e-4)
