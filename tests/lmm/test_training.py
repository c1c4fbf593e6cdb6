"""End-to-end training through train.py on a tiny shapes world: loss falls, checkpoints, resume, reload."""

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import train
from lmm.checkpoint_io import read_checkpoint
from lmm.run_dir import RunDir, load_run


def _scalars(run_dir, stage, tag):
    acc = EventAccumulator(str(run_dir / "tensorboard" / stage))
    acc.Reload()
    return [e.value for e in acc.Scalars(tag)]


def test_pretrain_loss_falls_and_tensorboard_logs_it(tiny_args, tmp_path):
    args = tiny_args(steps=(40, 1)) + ["run_stages=[pretrain]", "stages.pretrain.lr=3e-3"]
    assert train.main(args) == 0
    run_dir = tmp_path / "runs" / "t"
    losses = _scalars(run_dir, "pretrain", "train/loss")
    assert len(losses) == 40
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.6 * first, (first, last)
    assert (run_dir / "config.yaml").is_file() and (run_dir / "train.log").is_file()
    assert not list((run_dir / "tensorboard").glob("version_*")), "no auto-incremented logger versions"


@pytest.mark.parametrize("llm_mode", ["full", "lora"])
def test_checkpoints_hold_only_trainable_weights(tiny_args, tmp_path, llm_mode):
    args = tiny_args(steps=(2, 2)) + [f"stages.instruct.llm={llm_mode}", "stages.instruct.lora.r=4"]
    assert train.main(args) == 0
    run_dir = tmp_path / "runs" / "t"
    pre = read_checkpoint(RunDir(run_dir).last_checkpoint("pretrain"))["state_dict"]
    inst = read_checkpoint(RunDir(run_dir).last_checkpoint("instruct"))["state_dict"]
    assert not any(k.startswith("encoder.") for k in (*pre, *inst)), "the frozen encoder must not be saved"
    assert any(k.startswith("projector.") for k in inst)
    llm_keys = [k for k in inst if k.startswith("llm.")]
    if llm_mode == "lora":
        assert llm_keys and all("lora_" in k for k in llm_keys), "LoRA stage saves adapters only"
    else:
        assert "llm.model.model.embed_tokens.weight" in inst

    # Reloading the run replays both stages and reproduces the trained weights exactly.
    model, _ = load_run(run_dir)
    params = dict(model.named_parameters())
    for key, value in inst.items():
        assert torch.equal(params[key], value), key
    for key in pre:
        if key not in inst and key in params:
            assert torch.equal(params[key], pre[key]), key


def test_stage_resumes_from_last_checkpoint_and_finished_stage_is_skipped(tiny_args, tmp_path, caplog):
    base = tiny_args(steps=(2, 1)) + ["run_stages=[pretrain]"]
    assert train.main(base) == 0
    ckpt = RunDir(tmp_path / "runs" / "t").last_checkpoint("pretrain")
    first = read_checkpoint(ckpt)
    assert first["global_step"] == 2

    caplog.set_level("INFO")
    assert train.main(base + ["stages.pretrain.max_steps=4"]) == 0
    assert "resuming stage pretrain" in caplog.text
    second = read_checkpoint(ckpt)
    assert second["global_step"] == 4
    assert second["optimizer_states"][0]["state"], "optimizer state is checkpointed for resume"
    assert not all(torch.equal(first["state_dict"][k], second["state_dict"][k]) for k in first["state_dict"])

    caplog.clear()
    assert train.main(base + ["stages.pretrain.max_steps=4"]) == 0
    assert "already finished" in caplog.text
    assert read_checkpoint(ckpt)["global_step"] == 4


@pytest.mark.parametrize("every", [2, 3])
def test_last_checkpoint_holds_the_final_step_and_is_written_once_there(
    tiny_args, tmp_path, monkeypatch, every
):
    writes = []
    replace = train.os.replace

    def counting_replace(src, dst):
        writes.append(str(dst))
        return replace(src, dst)

    monkeypatch.setattr(train.os, "replace", counting_replace)
    args = tiny_args(steps=(4, 1)) + [
        "run_stages=[pretrain]",
        f"stages.pretrain.checkpoint_every_n_steps={every}",
    ]
    assert train.main(args) == 0
    assert read_checkpoint(RunDir(tmp_path / "runs" / "t").last_checkpoint("pretrain"))["global_step"] == 4
    # Periodic saves at steps 2 and 4 (the last one is final) or at step 3 plus the end-of-stage save.
    assert sum(w.endswith("last.ckpt") for w in writes) == 2


def test_instructed_model_generates_from_a_reloaded_run(tiny_args, tmp_path):
    assert train.main(tiny_args(steps=(2, 2))) == 0
    model, config = load_run(tmp_path / "runs" / "t")
    image = torch.zeros(3, model.encoder.image_size, model.encoder.image_size)
    texts = model.generate(
        ["<image>\nWhat colour is the circle?", "How many sides does a triangle have?"],
        [image, None],
        max_new_tokens=3,
    )
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    assert (tmp_path / "runs" / "t" / "qa_eval.json").is_file()


def test_true_half_precision_trains_with_device_side_images(tiny_args):
    # "bf16-true" casts the model to bf16 while the images become floating only inside the step
    # (the cast itself is checked in test_prepare_batch; the encoders would also cast their input).
    args = tiny_args(steps=(2, 2)) + ["trainer.precision=bf16-true", "grounding.enabled=false"]
    assert train.main(args) == 0
