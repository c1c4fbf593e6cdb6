"""Export to transformers' LLaVA format and back: the exported folder, loaded by transformers alone, gives
the project's logits and greedy tokens; what LlavaForConditionalGeneration cannot represent is refused."""

import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from datamodules.templates import get_template
from lmm.chat_runner import ChatRunner
from lmm.export import ExportError, chat_template_jinja, export_llava_hf, main
from lmm.llava_hf_import import LlavaHfError, lmm_from_llava_hf
from lmm.run_dir import load_run

QUESTION = "What colour is the circle?"
#: Three aspect ratios: wide, tall, square (pad adds bands on different sides; square adds none).
SHAPES = ((24, 40, 3), (44, 26, 3), (33, 33, 3))


def pictures(seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)) for shape in SHAPES]


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "llava-hf"
    assert main(["hf", "--run", str(tiny_run), "--out", str(out)]) == 0
    return out


def load_hf(folder):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(folder)


def hf_inputs(processor, image, question=QUESTION):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    return text, processor(images=image, text=text, return_tensors="pt")


def relative_error(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_exported_folder_gives_the_projects_logits_and_greedy_tokens(exported, tiny_run):
    config = json.loads((exported / "config.json").read_text())
    assert config["architectures"] == ["LlavaForConditionalGeneration"]
    assert config["vision_feature_layer"] == -2 and config["vision_feature_select_strategy"] == "default"
    assert config["vision_config"]["hidden_act"] == "quick_gelu"
    hf, processor = load_hf(exported)
    model, run_config = load_run(tiny_run)
    last = run_config.stages[run_config.run_stages[-1]]
    runner = ChatRunner(model, last.template, last.aspect)
    for image in pictures():
        text, inputs = hf_inputs(processor, image)
        assert text == runner.prompt(QUESTION, has_image=True)
        ours = runner.batch([text], [image])
        assert torch.equal(inputs["input_ids"], ours.input_ids)
        assert torch.equal(inputs["pixel_values"], ours.images), "the processor reproduces the pad transform"
        with torch.no_grad():
            theirs_logits = hf(**inputs).logits
            our_logits = model(ours.input_ids, ours.attention_mask, ours.images).logits
        assert relative_error(theirs_logits, our_logits) < 1e-5
        with torch.no_grad():
            theirs = hf.generate(**inputs, max_new_tokens=20, min_new_tokens=20, do_sample=False)
            our_tokens = model.generate_from(ours, max_new_tokens=20, min_new_tokens=20)
        assert theirs[:, inputs["input_ids"].shape[1] :].tolist() == our_tokens.tolist()
        assert our_tokens.shape == (1, 20)


@pytest.mark.parametrize("name", ["vicuna_v1", "vicuna_v1_question_first", "plain"])
def test_chat_template_renders_the_runs_template(name):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    template = get_template(name)
    jinja = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(
        chat_template_jinja(template)
    )
    image_turn = {
        "role": "user",
        "content": [{"type": "image"}, {"type": "text", "text": " <image> Hi there "}],
    }
    assert jinja.render(messages=[image_turn], add_generation_prompt=True) == template.prompt(
        " <image> Hi there ", True
    )
    as_string = {"role": "user", "content": "Hi there\n<image>"}
    assert jinja.render(messages=[as_string], add_generation_prompt=True) == template.prompt(
        "Hi there\n<image>", True
    )
    conversation = [
        {"from": "human", "value": "<image>\nWhat is it?"},
        {"from": "gpt", "value": "A red circle."},
        {"from": "human", "value": "And the size?"},
        {"from": "gpt", "value": "Large."},
    ]
    if name == "plain":
        conversation = conversation[:2]
    messages = [
        {"role": "user" if turn["from"] == "human" else "assistant", "content": turn["value"]}
        for turn in conversation
    ]
    assert (
        jinja.render(messages=messages, add_generation_prompt=False)
        == template.render(conversation, True).text
    )
    if name == "vicuna_v1":
        with_system = [{"role": "system", "content": "Be brief."}, *messages[:1]]
        assert jinja.render(messages=with_system, add_generation_prompt=True) == (
            "Be brief. USER: <image>\nWhat is it? ASSISTANT:"
        )


def test_lora_is_merged_before_export(tiny_run, tmp_path):
    from lmm.llm import LoraConfig

    model, config = load_run(tiny_run)
    model.llm.enable_lora(LoraConfig(r=4, alpha=8, dropout=0.0))
    generator = torch.Generator().manual_seed(0)
    for name, param in model.llm.model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero (an identity adapter); make the adapter matter
            param.data = torch.randn(param.shape, generator=generator) * 0.5
    model.eval()
    runner = ChatRunner(model, "vicuna_v1", "pad")
    image = pictures()[0]
    ours = runner.batch([runner.prompt(QUESTION, True)], [image])
    with torch.no_grad():
        with_adapters = model(ours.input_ids, ours.attention_mask, ours.images).logits
    export_llava_hf(model, tmp_path / "out", template="vicuna_v1", aspect="pad")
    assert not model.llm.lora_enabled
    hf, processor = load_hf(tmp_path / "out")
    _, inputs = hf_inputs(processor, image)
    with torch.no_grad():
        assert relative_error(hf(**inputs).logits, with_adapters) < 1e-5


def test_what_llava_cannot_represent_is_refused(tiny_world, tmp_path, capsys):
    from lmm.config import LLMConfig, ProjectorConfig
    from lmm.config_loading import load_config
    from lmm.model import LMM

    fused = load_config(None, ["encoder=fused_tiny", f"llm.tokenizer={tiny_world}/tokenizer"]).encoder
    llm = LLMConfig(
        tokenizer=str(tiny_world / "tokenizer"),
        hidden_size=128,
        num_layers=1,
        num_heads=2,
        intermediate_size=64,
    )
    model = LMM(fused, ProjectorConfig(positional_embedding=True), llm)
    with pytest.raises(ExportError, match="encoder 'fused'.*only the clip encoder exports"):
        export_llava_hf(model, tmp_path / "fused", template="vicuna_v1", aspect="pad")
    assert not (tmp_path / "fused").exists(), "nothing is written for a refused model"
    clip_model = LMM(fused.clip, ProjectorConfig(name="linear"), llm)
    with pytest.raises(ExportError, match="not mlp2x_gelu"):
        export_llava_hf(clip_model, tmp_path / "linear", template="vicuna_v1", aspect="pad")
    # The default's convolutional tower has no CLIPVisionModel form.
    convnet = load_config(None, ["encoder.pretrain=null", f"llm.tokenizer={tiny_world}/tokenizer"]).encoder
    with pytest.raises(ExportError, match="convnet CLIP tower .* has no CLIPVisionModel equivalent"):
        export_llava_hf(
            LMM(convnet, ProjectorConfig(), llm), tmp_path / "convnet", template="vicuna_v1", aspect="pad"
        )
    assert not (tmp_path / "convnet").exists()
    # The command refuses a fused run from its config, before building the model.
    run = tmp_path / "runs" / "fused"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(OmegaConf.to_yaml({"encoder": {"name": "fused"}}))
    assert main(["hf", "--run", str(run), "--out", str(tmp_path / "fused-out")]) == 2
    assert "encoder 'fused' has no LlavaForConditionalGeneration equivalent" in capsys.readouterr().out
    assert not (tmp_path / "fused-out").exists()
    (run / "config.yaml").write_text(OmegaConf.to_yaml({"encoder": {"name": "clip", "model": "convnet"}}))
    assert main(["hf", "--run", str(run), "--out", str(tmp_path / "convnet-out")]) == 2
    assert "encoder 'clip/convnet' has no LlavaForConditionalGeneration equivalent" in capsys.readouterr().out


def test_llava_hf_folder_loads_back_as_initial_weights(exported, tiny_run, tmp_path):
    model, _ = load_run(tiny_run)
    back = lmm_from_llava_hf(exported, tmp_path / "init").eval()
    assert back.encoder.config.model == "hf" and back.encoder.config.select_layer == -2
    runner, back_runner = ChatRunner(model), ChatRunner(back)
    image = pictures()[1]
    ours = runner.batch([runner.prompt(QUESTION, True)], [image])
    theirs = back_runner.batch([back_runner.prompt(QUESTION, True)], [image])
    assert torch.equal(ours.input_ids, theirs.input_ids) and torch.equal(ours.images, theirs.images)
    with torch.no_grad():
        expected = model(ours.input_ids, ours.attention_mask, ours.images).logits
        got = back(theirs.input_ids, theirs.attention_mask, theirs.images).logits
    assert relative_error(got, expected) < 1e-5
    # It trains like any LMM: the stage's trainable parts get gradients, the CLIP tower stays frozen.
    from lmm.model import StageConfig

    rebuilt = back
    rebuilt.configure_stage("instruct", StageConfig(template="vicuna_v1", aspect="pad", llm="full"))
    rebuilt.train()
    labels = theirs.input_ids.clone()
    labels[:, :-3] = -100
    loss = rebuilt(theirs.input_ids, theirs.attention_mask, theirs.images, labels).loss
    loss.backward()
    assert torch.isfinite(loss) and rebuilt.projector.mlp[0].weight.grad.abs().sum() > 0
    assert rebuilt.encoder.tower.embeddings.patch_embedding.weight.grad is None, "the tower stays frozen"

    config = json.loads((exported / "config.json").read_text())
    config["vision_feature_select_strategy"] = "full"
    broken = tmp_path / "broken"
    broken.mkdir()
    for path in exported.iterdir():
        (broken / path.name).write_bytes(path.read_bytes())
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(LlavaHfError, match="keeps the CLS feature"):
        lmm_from_llava_hf(broken, tmp_path / "init2")
    assert not (tmp_path / "init2").exists()


def test_released_llava15_exports_with_its_image_token_added(tmp_path):
    from lmm.released.llava15 import load_llava15
    from lmm.released.random_release import write_random_llava15

    weights, clip = write_random_llava15(tmp_path / "release", "tiny", dtype=torch.float32)
    assert main(["hf", "--llava15", str(weights), "--clip", str(clip), "--out", str(tmp_path / "out")]) == 0
    model = load_llava15(weights, clip)
    hf, processor = load_hf(tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    vocab = model.llm.model.get_input_embeddings().weight.shape[0]
    assert config["image_token_index"] == vocab and config["text_config"]["vocab_size"] == vocab + 1
    assert config["vision_config"]["num_hidden_layers"] == 3, "the whole tower, as llava-hf holds it"
    assert hf.generation_config.suppress_tokens == [vocab]
    for image in pictures(1):
        _, inputs = hf_inputs(processor, image, "w5 w9")
        with torch.no_grad():
            theirs = hf(**inputs).logits
            ours = model(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"]).logits
        assert relative_error(theirs[..., :vocab], ours) < 1e-5
        assert (theirs[..., vocab:] == 0).all()
        with torch.no_grad():
            hf_tokens = hf.generate(**inputs, max_new_tokens=20, min_new_tokens=20)[
                :, inputs["input_ids"].shape[1] :
            ]
            from lmm.model import PromptBatch

            batch = PromptBatch(inputs["input_ids"], inputs["attention_mask"], [], inputs["pixel_values"])
            our_tokens = model.generate_from(batch, max_new_tokens=20, min_new_tokens=20)
        assert hf_tokens.tolist() == our_tokens.tolist()


def test_training_starts_from_a_llava_hf_folder_named_by_the_config(exported, tiny_run, tiny_world, tmp_path):
    """``init.llava_hf``: train.py unpacks the folder into the run, its config names the unpacked weights, and
    the model it trains starts from them (a learning rate of 1e-12 leaves them as they were)."""
    from conftest import tiny_overrides

    import train
    from lmm.config_loading import load_config

    args = tiny_overrides(tiny_world, tmp_path / "runs", run_name="from-hf", steps=(1, 1)) + [
        f"init.llava_hf={exported}",
        "run_stages=[instruct]",
        "stages.instruct.lr=1e-12",
        "grounding.enabled=false",
        "qa_eval.questions=null",
    ]
    assert train.main(args) == 0
    run = tmp_path / "runs" / "from-hf"
    saved = load_config([str(run / "config.yaml")], [])
    assert saved.encoder.model == "hf" and saved.encoder.weights == str(run / "init" / "clip")
    assert saved.llm.path == str(run / "init" / "llm") and saved.init.llava_hf == str(exported)
    started, _ = load_run(run)
    model, _ = load_run(tiny_run)
    runner, started_runner = ChatRunner(model), ChatRunner(started)
    image = pictures()[0]
    ours = runner.batch([runner.prompt(QUESTION, True)], [image])
    theirs = started_runner.batch([started_runner.prompt(QUESTION, True)], [image])
    with torch.no_grad():
        expected = model(ours.input_ids, ours.attention_mask, ours.images).logits
        got = started(theirs.input_ids, theirs.attention_mask, theirs.images).logits
    assert relative_error(got, expected) < 1e-5
    # The same command again finds the run finished: the unpacked sections are bound to init.llava_hf.
    assert train.main(args) == 0
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert len(history) == 2 and history[1]["changed"] == {}
