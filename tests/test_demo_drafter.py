"""The demo drafter shipped in the package (redrafter/demo/shipped_drafter, `shipped.py`): its
checksum, recipe and shapes; a damaged copy, another GGUF or a changed recipe refused with one
line naming the fix (never a silent training); the fp32 -> fp16 conversion that writes it;
`--retrain-drafter`. Only the checks against the real GGUF and the shared data skip when those
are absent; the rest read the shipped files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from test_demo_recipe import _shared_data

from redrafter import demo
from redrafter.demo import __main__ as demo_main
from redrafter.demo import data as demo_data
from redrafter.demo import shipped
from redrafter.demo.drafter import training_estimate
from redrafter.errors import RedrafterError
from redrafter.models.checkpoints import load_base_config, load_drafter, save_drafter
from redrafter.models.drafter import Drafter

from conftest import tiny_base, tiny_drafter, write_hf_checkpoint

SHIPPED = shipped.SHIPPED_DIR
# Both shipped drafters: distilled from the fp32 GGUF, and from its int4 bundle (INT4_RECIPE).
FOLDERS = pytest.mark.parametrize(
    "folder, recipe",
    [(shipped.SHIPPED_DIR, demo.RECIPE), (shipped.SHIPPED_INT4_DIR, demo.INT4_RECIPE)],
    ids=["fp32", "int4"],
)


def _one_line_error(call, *needles: str) -> str:
    with pytest.raises(shipped.ShippedDrafterError) as err:
        call()
    message = str(err.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message
    return message


def _fake_gguf(tmp_path: Path, size: int = 1000) -> Path:
    path = tmp_path / "other.gguf"
    path.write_bytes(b"GGUF" + bytes(size - 4))
    return path


@FOLDERS
def test_shipped_weights_match_their_checksum_and_are_fp16(folder, recipe):
    meta = shipped.verify_weights(folder)
    assert shipped.file_sha256(folder / "model.safetensors") == meta.weights_sha256
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        dtypes = {name: f.get_slice(name).get_dtype() for name in f.keys()}
    assert dtypes.pop("draft_token_ids") == "I64"
    assert set(dtypes.values()) == {"F16"}
    assert json.loads((folder / "config.json").read_text())["torch_dtype"] == "float16"
    assert (folder / "README.md").is_file()


@FOLDERS
def test_metadata_recipe_is_the_demo_recipe(folder, recipe):
    """Changing RECIPE without retraining and shipping the drafters fails here."""
    assert shipped.ShippedMetadata.read(folder).recipe == recipe
    assert shipped.shipped_folder(recipe) == folder


@FOLDERS
def test_shipped_drafter_loads_with_the_config_shapes(folder, recipe):
    drafter = load_drafter(folder)  # names and every shape checked against config.json
    config = json.loads((folder / "config.json").read_text())
    assert isinstance(drafter, Drafter)
    c = drafter.config
    assert (c.vocab_size, c.hidden_size, c.exit_dim) == (49152, 576, 576)
    assert (c.num_draft_layers, c.draft_vocab_size) == (1, 2048)
    assert c.vocab_size == config["vocab_size"] and c.draft_vocab_size == config["draft_vocab_size"]
    assert drafter.lm_head[-1].weight.shape == (2048, 576)  # draft vocab x hidden
    assert all(p.dtype == torch.float32 for p in drafter.parameters())  # fp16 file, fp32 model
    params = sum(p.numel() for p in drafter.parameters())
    assert params == shipped.ShippedMetadata.read(folder).training["parameters"] == 2_840_256


@pytest.mark.parametrize("damage", ["flip", "truncate", "missing"])
def test_a_damaged_copy_is_refused_in_one_line(tmp_path, damage):
    copy = Path(shutil.copytree(SHIPPED, tmp_path / "copy"))
    weights = copy / "model.safetensors"
    if damage == "flip":
        raw = bytearray(weights.read_bytes())
        raw[len(raw) // 2] ^= 0x01  # one bit of one weight
        weights.write_bytes(bytes(raw))
    elif damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:1000])
    else:
        weights.unlink()
    gguf = _fake_gguf(tmp_path)
    _one_line_error(
        lambda: shipped.shipped_drafter(gguf, recipe=demo.RECIPE, folder=copy),
        "does not match metadata.json",
        "reinstall redrafter",
        "--retrain-drafter",
    )


def test_damaged_metadata_is_refused_in_one_line(tmp_path):
    copy = Path(shutil.copytree(SHIPPED, tmp_path / "copy"))
    (copy / "metadata.json").write_text('{"weights": {}}')
    _one_line_error(lambda: shipped.verify_weights(copy), "metadata.json", "reinstall redrafter")


def test_another_gguf_or_recipe_is_refused_and_names_the_retrain_flag(tmp_path):
    gguf = _fake_gguf(tmp_path)
    _one_line_error(
        lambda: shipped.shipped_drafter(gguf, recipe=demo.RECIPE),
        "not the GGUF the shipped drafter was trained for",
        "--retrain-drafter",
    )
    message = _one_line_error(
        lambda: shipped.shipped_drafter(gguf, recipe={**demo.RECIPE, "epochs": 5}),
        "another recipe",
        "--retrain-drafter",
    )
    assert "epochs" in message and "train_prompts" not in message


def test_the_demo_refuses_another_gguf_with_exit_2_and_trains_nothing(tmp_path, monkeypatch):
    gguf = _fake_gguf(tmp_path)
    monkeypatch.setattr("redrafter.demo.run.find_demo_gguf", lambda: gguf)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    result = CliRunner().invoke(demo_main.run, [])
    assert result.exit_code == 2
    assert result.output.startswith("error: ") and result.output.count("\n") == 1
    assert "--retrain-drafter" in result.output
    assert not (tmp_path / "cache" / "redrafter" / "drafters").exists()  # no training began


def test_retrain_flag_reaches_the_demo(monkeypatch):
    calls = []
    monkeypatch.setattr(demo_main, "main", lambda **kw: calls.append(kw))
    assert CliRunner().invoke(demo_main.run, ["--retrain-drafter"]).exit_code == 0
    assert CliRunner().invoke(demo_main.run, []).exit_code == 0
    assert calls == [{"retrain_drafter": True}, {"retrain_drafter": False}]


def test_training_estimate_from_the_recipe_size():
    # 4,008 prompts x 0.7 s; 4 epochs x ceil(4,000 x 92.5 / 256) = 4 x 1,446 steps x 0.065 s
    answers, training = training_estimate(demo.RECIPE)
    assert answers == pytest.approx(2805.6)
    assert training == pytest.approx(4 * 1446 * 0.065)
    # the int4 teacher: 4,008 x 0.3 s; 4 x ceil(4,000 x 100 / 256) = 4 x 1,563 steps
    answers, training = training_estimate(demo.INT4_RECIPE)
    assert answers == pytest.approx(1202.4)
    assert training == pytest.approx(4 * 1563 * 0.065)


def test_write_shipped_halves_a_trained_drafter_and_records_its_digests(tmp_path):
    base = tiny_base()
    trained = save_drafter(tiny_drafter(base, exit_dim=32), tmp_path / "trained")
    recipe = {**demo.RECIPE, "train_prompts": 6, "heldout_prompts": 2, "draft_vocab": None}
    options = {k: recipe[k] for k in shipped.TRAIN_FIELDS}
    state = {"step": 9, "total_steps": 9, "options": options, "examples": 50, "history": []}
    (trained / "trainer_state.json").write_text(json.dumps(state))
    data = _shared_data(tmp_path / "data")
    gguf = _fake_gguf(tmp_path, size=4096)
    out = tmp_path / "out"

    meta = shipped.write_shipped(trained, gguf, out, recipe=recipe, data_dir=data)
    assert meta.recipe == recipe and meta.base_bytes == 4096
    assert meta.base_sha256 == shipped.file_sha256(gguf)
    assert meta.data[str(demo_data.JARGON)] == shipped.file_sha256(data / demo_data.JARGON)
    prompts = demo_data.training_prompts(data, count=6)
    assert meta.data["training_prompts"] == {"count": 6, "sha256": shipped.prompts_sha256(prompts)}
    assert shipped.ShippedMetadata.read(out) == meta
    assert shipped.shipped_drafter(gguf, recipe=recipe, folder=out) == out

    full, half = load_drafter(trained).state_dict(), load_drafter(out).state_dict()
    for name, w in full.items():
        assert torch.equal(half[name], w.half().float()), name  # exactly the fp16 rounding
    assert (out / "model.safetensors").stat().st_size < 0.6 * (
        trained / "model.safetensors"
    ).stat().st_size

    state["options"]["epochs"] = 7  # weights from another recipe are never shipped under this one
    (trained / "trainer_state.json").write_text(json.dumps(state))
    _one_line_error(
        lambda: shipped.write_shipped(trained, gguf, out, recipe=recipe, data_dir=data), "epochs"
    )


@FOLDERS
def test_shipped_drafter_fits_the_installed_demo_gguf(folder, recipe):
    try:
        gguf = demo.find_demo_gguf()
    except RedrafterError:
        pytest.skip("demo GGUF not installed (make demo-model, or set REDRAFTER_SMOLLM2_GGUF)")
    # shipped: no cache touched
    assert demo.ensure_drafter(gguf, Path("/nonexistent-cache"), recipe) == folder
    base = load_base_config(gguf)
    drafter = load_drafter(folder).config
    assert (drafter.vocab_size, drafter.hidden_size) == (base.vocab_size, base.hidden_size)


def test_metadata_data_digests_match_the_shared_data():
    """The recorded digests are what `data.py` draws from the shared data today: a change to
    the prompt selection (or the data) without retraining fails here."""
    try:
        data = demo_data.find_shared_data()
    except RedrafterError:
        pytest.skip("shared data folder absent (../shared/data or $REDRAFTER_SHARED_DATA)")
    meta = shipped.ShippedMetadata.read()
    assert shipped.ShippedMetadata.read(shipped.SHIPPED_INT4_DIR).data == meta.data
    for rel in (demo_data.JARGON, demo_data.HUMANEVAL):
        assert meta.data[str(rel)] == shipped.file_sha256(data / rel)
    train = demo_data.training_prompts(data, count=meta.recipe["train_prompts"])
    held = demo_data.heldout_prompts(data, count=meta.recipe["heldout_prompts"])
    assert meta.data["training_prompts"]["sha256"] == shipped.prompts_sha256(train)
    assert meta.data["heldout_prompts"]["sha256"] == shipped.prompts_sha256(held)


def test_retrain_trains_with_an_estimate_and_without_it_nothing_trains(
    tmp_path, monkeypatch, capsys
):
    """The demo recipe never trains unless asked: with a recipe the shipped drafter was not
    trained with, `ensure_drafter` refuses in one line; `retrain=True` trains, announcing the
    time it will take and each phase."""
    base = write_hf_checkpoint(tiny_base(), tmp_path / "base")
    template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"  # the prompts are chats
    (base / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    data = _shared_data(tmp_path / "data")
    monkeypatch.setattr(demo_data, "find_shared_data", lambda *a, **k: data)
    small = {**demo.RECIPE, "train_prompts": 6, "heldout_prompts": 2, "seq_len": 8}
    small.update(epochs=1, batch_size=16, draft_vocab=None)
    monkeypatch.setattr(demo.drafter, "RECIPE", small)  # the demo's recipe, shrunk
    cache = tmp_path / "cache"

    _one_line_error(lambda: demo.ensure_drafter(base, cache), "another recipe", "--retrain")
    assert not cache.exists()

    folder = demo.ensure_drafter(base, cache, retrain=True)
    state = json.loads((folder / "trainer_state.json").read_text())
    assert state["step"] == state["total_steps"] > 0
    err = capsys.readouterr().err
    assert "min on an idle 2-core CPU" in err
    assert "1/2 base answers: 6 + 2 prompts" in err and "2/2 training" in err


def test_an_int4_recipe_learns_from_the_int4_teacher_bundle(tmp_path, monkeypatch, capsys):
    """A recipe with `"teacher": "int4"` (INT4_RECIPE, shrunk) exports the base-only int4
    teacher bundle once, takes the answers from it (teacher data marked `bundle:int4`, cached
    apart from the fp32 recipe's) and trains."""
    base = write_hf_checkpoint(tiny_base(), tmp_path / "base")
    template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    (base / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    data = _shared_data(tmp_path / "data")
    monkeypatch.setattr(demo_data, "find_shared_data", lambda *a, **k: data)
    small = {**demo.INT4_RECIPE, "train_prompts": 6, "heldout_prompts": 2, "seq_len": 8}
    small.update(epochs=1, batch_size=16, draft_vocab=None)
    cache = tmp_path / "cache"
    folder = demo.ensure_drafter(base, cache, small)
    state = json.loads((folder / "trainer_state.json").read_text())
    assert state["step"] == state["total_steps"] > 0
    teachers = list((cache / "bundles").glob("*-teacher-*-int4"))
    assert len(teachers) == 1 and (teachers[0] / "manifest.json").is_file()
    manifests = list((cache / "teacher").glob("*/train/manifest.json"))
    assert [json.loads(m.read_text())["base_dtype"] for m in manifests] == ["bundle:int4"]
    assert "exporting the int4 teacher bundle" in capsys.readouterr().err
    # The fp32 recipe of the same size keeps its own answers.
    fp32 = {k: v for k, v in small.items() if k != "teacher"}
    demo.ensure_drafter(base, cache, fp32)
    dtypes = sorted(json.loads(m.read_text())["base_dtype"]
                    for m in (cache / "teacher").glob("*/train/manifest.json"))  # fmt: skip
    assert dtypes == ["bundle:int4", "float32"]
